"""bepa_jax.distributed: env resolution (unit) and real 2-process runs on 127.0.0.1."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from bepa_jax import distributed
from bepa_jax.distributed import resolve, slurm_first_host
from launch.local import free_port, run_local

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = {"JAX_PLATFORMS": "cpu"}  # keeps TPU auto-detection out of unit tests


@pytest.fixture
def clean_env(monkeypatch):
  for key in list(os.environ):
    if key.startswith(("BEPA_", "SLURM_", "TPU_", "MEGASCALE_")):
      monkeypatch.delenv(key)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")


# --------------------------------------------------------------------------- resolution


def test_single_process_when_nothing_is_set():
  assert resolve(env=CPU).method == "single"
  assert not resolve(env=CPU).multi_process


def test_explicit_env():
  env = {
    **CPU,
    "BEPA_COORDINATOR_ADDRESS": "10.0.0.2:1234",
    "BEPA_NUM_PROCESSES": "4",
    "BEPA_PROCESS_ID": "3",
  }
  setup = resolve(env=env)
  assert (setup.method, setup.coordinator_address, setup.num_processes, setup.process_id) == (
    "explicit",
    "10.0.0.2:1234",
    4,
    3,
  )


def test_arguments_win_over_env():
  env = {
    **CPU,
    "BEPA_COORDINATOR_ADDRESS": "10.0.0.2:1234",
    "BEPA_NUM_PROCESSES": "4",
    "BEPA_PROCESS_ID": "3",
  }
  setup = resolve("h:99", 2, 1, env=env)
  assert (setup.coordinator_address, setup.num_processes, setup.process_id) == ("h:99", 2, 1)


def test_one_process_is_single():
  env = {
    **CPU,
    "BEPA_COORDINATOR_ADDRESS": "h:1",
    "BEPA_NUM_PROCESSES": "1",
    "BEPA_PROCESS_ID": "0",
  }
  assert resolve(env=env).method == "single"


@pytest.mark.parametrize(
  "nodelist, host",
  [
    ("node1", "node1"),
    ("host[1-3]", "host1"),
    ("gpu[003-005,9]", "gpu003"),
    ("a12,b[1-2]", "a12"),
    ("c[7,2-3],d1", "c7"),
    ("rack[2-3]-n[07-08]", "rack2-n07"),
  ],
)
def test_slurm_first_host(nodelist, host):
  assert slurm_first_host(nodelist) == host


def test_slurm_env():
  env = {
    **CPU,
    "SLURM_JOB_ID": "12345",
    "SLURM_PROCID": "2",
    "SLURM_NTASKS": "4",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "tpu-host[07-08]",
  }
  setup = resolve(env=env)
  port = 61440 + 12345 % 4096
  assert (setup.method, setup.coordinator_address, setup.num_processes, setup.process_id) == (
    "slurm",
    f"tpu-host07:{port}",
    4,
    2,
  )


def test_slurm_nodes_and_port_override():
  env = {
    **CPU,
    "SLURM_PROCID": "1",
    "SLURM_JOB_NUM_NODES": "3",
    "SLURM_JOB_NODELIST": "n[1-3]",
    "BEPA_COORDINATOR_PORT": "4321",
  }
  setup = resolve(env=env)
  assert (setup.coordinator_address, setup.num_processes, setup.process_id) == ("n1:4321", 3, 1)


def test_cloud_tpu_env_means_auto():
  env = {"TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "a,b"}
  assert resolve(env=env).method == "tpu"
  # ... unless JAX is told to stay off the TPU.
  assert resolve(env={**env, **CPU}).method == "single"


@pytest.mark.parametrize(
  "env, match",
  [
    (
      {"BEPA_NUM_PROCESSES": "two", "BEPA_PROCESS_ID": "0", "BEPA_COORDINATOR_ADDRESS": "h:1"},
      "BEPA_NUM_PROCESSES must be an integer, got 'two'",
    ),
    (
      {"BEPA_NUM_PROCESSES": "2", "BEPA_PROCESS_ID": "1.5", "BEPA_COORDINATOR_ADDRESS": "h:1"},
      "BEPA_PROCESS_ID must be an integer",
    ),
    (
      {"BEPA_NUM_PROCESSES": "2", "BEPA_PROCESS_ID": "2", "BEPA_COORDINATOR_ADDRESS": "h:1"},
      "BEPA_PROCESS_ID=2 must be smaller than BEPA_NUM_PROCESSES=2",
    ),
    (
      {"BEPA_NUM_PROCESSES": "2", "BEPA_PROCESS_ID": "-1", "BEPA_COORDINATOR_ADDRESS": "h:1"},
      "BEPA_PROCESS_ID must be >= 0",
    ),
    (
      {"BEPA_NUM_PROCESSES": "0", "BEPA_PROCESS_ID": "0", "BEPA_COORDINATOR_ADDRESS": "h:1"},
      "BEPA_NUM_PROCESSES must be >= 1",
    ),
    (
      {"BEPA_NUM_PROCESSES": "2", "BEPA_PROCESS_ID": "0", "BEPA_COORDINATOR_ADDRESS": "nohost"},
      "BEPA_COORDINATOR_ADDRESS must look like HOST:PORT",
    ),
    ({"BEPA_NUM_PROCESSES": "2", "BEPA_PROCESS_ID": "1"}, "BEPA_COORDINATOR_ADDRESS not set"),
    (
      {"SLURM_PROCID": "x", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"},
      "SLURM_PROCID must be an integer",
    ),
    (
      {"SLURM_PROCID": "4", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"},
      "SLURM_PROCID=4 must be smaller than SLURM_NTASKS=4",
    ),
  ],
)
def test_bad_values(env, match):
  with pytest.raises(ValueError, match=re.escape(match)):
    resolve(env={**CPU, **env})


def test_bad_arguments_name_the_argument():
  with pytest.raises(ValueError, match="process_id=3 must be smaller than num_processes=2"):
    resolve("h:1", 2, 3, env=CPU)
  with pytest.raises(ValueError, match="num_processes must be an integer"):
    resolve("h:1", "lots", 0, env=CPU)


def test_initialize_single_process_is_a_no_op(clean_env):
  assert distributed.initialize().method == "single"
  assert distributed.is_coordinator()


def test_initialize_rejects_bad_values_before_touching_jax(clean_env):
  with pytest.raises(ValueError, match="process_id=2 must be smaller than num_processes=2"):
    distributed.initialize("127.0.0.1:1234", 2, 2)
  with pytest.raises(ValueError, match="timeout_s"):
    distributed.initialize("127.0.0.1:1234", 2, 0, timeout_s=0)


# --------------------------------------------------------------------------- real processes

JOB = textwrap.dedent(
  """
    import numpy as np
    from bepa_jax import distributed

    setup = distributed.initialize(timeout_s=60)
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("data",))
    pid = jax.process_index()
    # each process holds 2 rows per local device: process p contributes 100*p + [0..3]
    local = np.arange(2 * jax.local_device_count(), dtype=np.float32).reshape(-1, 1) + 100 * pid
    arr = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(arr)
    psum = jax.jit(
        jax.shard_map(lambda x: jax.lax.psum(x.sum(), "data"), mesh=mesh,
                      in_specs=P("data"), out_specs=P())
    )(arr)
    print(f"RESULT process={pid} method={setup.method} processes={jax.process_count()} "
          f"devices={jax.device_count()} shape={arr.shape} sum={float(total)} psum={float(psum)} "
          f"coordinator={distributed.is_coordinator()}", flush=True)
    """
)


def test_two_processes_on_localhost(tmp_path):
  script = tmp_path / "job.py"
  script.write_text(JOB)
  out = io.StringIO()
  code = run_local(
    [sys.executable, str(script)],
    num_processes=2,
    devices_per_process=2,
    log_dir=str(tmp_path / "logs"),
    stream=out,
    timeout_s=120,
  )
  logs = [(tmp_path / "logs" / f"worker_{k}.log").read_text() for k in range(2)]
  assert code == 0, out.getvalue() + "\n".join(logs)
  # process 0 holds 0+1+2+3 = 6, process 1 holds 100+101+102+103 = 406
  for k, log in enumerate(logs):
    line = next(l for l in log.splitlines() if l.startswith("RESULT"))
    assert f"process={k} method=explicit processes=2 devices=4 shape=(8, 1)" in line
    assert "sum=412.0 psum=412.0" in line
    assert f"coordinator={k == 0}" in line
  assert "RESULT process=0" in out.getvalue()  # worker 0 streamed to the console


TIMEOUT_JOB = textwrap.dedent(
  """
    import sys, time
    from bepa_jax import distributed
    start = time.monotonic()
    try:
        distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                               timeout_s=5)
    except distributed.DistributedInitError as err:
        print(f"DistributedInitError after {time.monotonic() - start:.1f}s: {err}", flush=True)
        sys.exit(17)
    print("initialized?!", flush=True)
    """
)


def test_initialization_timeout(tmp_path):
  """A process waiting for a peer that never comes (process 0), and one whose
  coordinator does not exist (process 1), both fail with DistributedInitError."""
  script = tmp_path / "timeout.py"
  script.write_text(TIMEOUT_JOB)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO_ROOT}
  start = time.monotonic()
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), f"127.0.0.1:{free_port()}", str(pid)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for pid in (0, 1)
  ]
  results = [p.communicate(timeout=60) for p in procs]
  assert time.monotonic() - start < 30
  for pid, (proc, (stdout, stderr)) in enumerate(zip(procs, results)):
    assert proc.returncode == 17, stdout + stderr
    message = stdout.strip().splitlines()[-1]
    assert "timed out after 5s" in message
    assert f"process_id={pid}, num_processes=2" in message
    assert "coordinator=127.0.0.1:" in message and "timeout=5s" in message
