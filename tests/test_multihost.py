"""The multi-host path for real: 2 processes x 2 CPU devices (gloo) vs 1 process x 4 devices."""
import json
import os
import sys

import numpy as np
import pytest

from launch.local import run_local
from tests.conftest import REPO
from tests.helpers import assert_params_close

SCRIPT = r'''
import json, os, sys
import numpy as np
from bepa_jax import distributed
distributed.initialize(timeout_s=120)
import jax
from jax.experimental import multihost_utils
from bepa_jax.training import throughput
from bepa_jax.trainer import build as build_lib
from bepa_jax.trainer import loop
from bepa_jax.config import load as config_load
from bepa_jax.cli import train as train_cli
from tests.helpers import tiny_config

calls = []  # host collectives, counted (every multihost_utils entry point the code uses)
for name in ("process_allgather", "sync_global_devices", "broadcast_one_to_all"):
  setattr(multihost_utils, name, (lambda f, n: lambda *a, **k: (calls.append(n), f(*a, **k))[1])(
      getattr(multihost_utils, name), name))
out, workdir, packed = sys.argv[1], sys.argv[2], sys.argv[3] == "packed"
config = tiny_config(**{"train.steps": 4, "train.log_every": 1, "train.global_batch": 16,
                        "data.packing": packed, "data.max_length": 128 if packed else 16,
                        "model.max_position_embeddings": 130 if packed else 64})
job = build_lib.build(config, workdir)
losses, shards, tokens, synced = [], [], [], []
with jax.set_mesh(job.mesh):
  state = job.state
  for step in range(4):
    # a step between log steps: batch + step with no device-to-host transfer, no collective
    before = len(calls)
    with jax.transfer_guard_device_to_host("disallow" if step else "allow"):
      local = job.pipeline.batch(step, jax.process_index(), jax.process_count())
      state, metrics = job.step_fn(state, loop.global_batch(local, job.mesh))
    synced.append(calls[before:])
    shards.append(local["input_ids"].tolist())
    local_counts = throughput.count(local, config.loss)
    tokens.append([local_counts.real, throughput.global_counts(local_counts).real,
                   throughput.global_counts(local_counts).processed])
    losses.append(float(metrics["loss"]))
params = multihost_utils.process_allgather(state.params, tiled=True)
flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
tag = f"{out}/p{jax.process_index()}"
np.savez(tag + ".npz", **flat)
json.dump({"losses": losses, "shards": shards, "tokens": tokens, "process_count": jax.process_count(),
           "device_count": jax.device_count(), "synced": synced},
          open(tag + ".json", "w"))
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  script = root / "job.py"
  script.write_text(SCRIPT)
  results = {}
  for name, (nproc, ndev) in {"single": (1, 4), "multi": (2, 2), "single_packed": (1, 4),
                               "multi_packed": (2, 2)}.items():
    out = root / name
    out.mkdir()
    layout = "packed" if name.endswith("packed") else "padded"
    rc = run_local([sys.executable, str(script), str(out), str(root / "wd"), layout],
                   num_processes=nproc,
                   devices_per_process=ndev, log_dir=str(root / f"logs_{name}"), stream=open(os.devnull, "w"),
                   cwd=REPO, timeout_s=300)
    assert rc == 0, open(root / f"logs_{name}" / "worker_0.log").read()[-3000:]
    results[name] = out
  return results


@pytest.mark.parametrize("layout", ["", "_packed"], ids=["padded", "packed"])
def test_two_processes_equal_one_process(runs, layout):
  """Packed: each process packs its own groups and they agree on the rows (from the global plan)."""
  single = json.load(open(runs["single" + layout] / "p0.json"))
  multi = [json.load(open(runs["multi" + layout] / f"p{i}.json")) for i in range(2)]
  assert single["device_count"] == 4 and multi[0]["device_count"] == 4
  assert multi[0]["process_count"] == 2
  np.testing.assert_allclose(multi[0]["losses"], single["losses"], rtol=1e-5)
  np.testing.assert_allclose(multi[1]["losses"], single["losses"], rtol=1e-5)
  a, b = np.load(runs["single" + layout] / "p0.npz"), np.load(runs["multi" + layout] / "p0.npz")
  assert set(a.files) == set(b.files)
  assert_params_close({k: b[k] for k in sorted(b.files)}, {k: a[k] for k in sorted(a.files)})


def test_process_shards_are_disjoint_and_form_the_global_batch(runs):
  single = json.load(open(runs["single"] / "p0.json"))
  multi = [json.load(open(runs["multi"] / f"p{i}.json")) for i in range(2)]
  for step in range(4):
    s0, s1 = np.array(multi[0]["shards"][step]), np.array(multi[1]["shards"][step])
    assert s0.shape[0] == s1.shape[0] == 8
    np.testing.assert_array_equal(np.concatenate([s0, s1]), np.array(single["shards"][step]))
    rows0 = {r.tobytes() for r in s0}
    assert not any(r.tobytes() in rows0 for r in s1)


def test_token_counts_are_summed_over_processes(runs):
  """Each process counts its own rows; throughput.global_counts makes them the global batch's."""
  single = json.load(open(runs["single"] / "p0.json"))
  multi = [json.load(open(runs["multi"] / f"p{i}.json")) for i in range(2)]
  for step in range(4):
    local_real, global_real, processed = single["tokens"][step]
    assert global_real == local_real and processed == 16 * 2 * 16  # one pass over [2B, L]
    for p in multi:
      assert p["tokens"][step][1:] == [global_real, processed]
    assert multi[0]["tokens"][step][0] + multi[1]["tokens"][step][0] == global_real
    assert multi[0]["tokens"][step][0] != global_real  # the shards are each only a part


@pytest.mark.parametrize("layout", ["", "_packed"], ids=["padded", "packed"])
def test_steps_between_log_steps_never_wait_for_the_devices(runs, layout):
  """Steps 1-3 of the 2-process runs built their batch and ran the step calling no host
  collective (before: packed runs all-gathered their packed rows every step, a device
  computation that waits for the previous step): the processes agree on the packed rows from
  the plan's integers. The steps also run under jax.transfer_guard_device_to_host("disallow"),
  which an accelerator enforces; on CPU arrays are host memory and it never fires, so the
  count of collectives is the check here."""
  for path in sorted((runs["multi" + layout]).glob("p*.json")):
    run = json.load(open(path))
    assert run["synced"][1:] == [[], [], []], run["synced"]
