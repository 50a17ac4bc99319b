"""host_memory: glibc keeps freed memory, so XLA:CPU's per-step buffers stop page-faulting."""
import os
import subprocess
import sys

import pytest

from bepa_jax import host_memory
from bepa_jax.errors import ConfigError
from tests.conftest import REPO

# A jitted function with a 64 MiB temporary, run 6 times to warm up (the retained heap
# settles within a few calls); prints the minor page faults of the next 4 calls.
_PROBE = """
import resource, sys
from bepa_jax import host_memory
applied = host_memory.configure(sys.argv[1])
import jax, jax.numpy as jnp
f = jax.jit(lambda a: jnp.tanh(a @ a.T).sum() + jnp.exp(-(a @ a.T)).sum())
x = jnp.ones((4096, 32)) / 32
for _ in range(6):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  f(x).block_until_ready()
print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                     env=env, cwd=REPO, timeout=120)
  assert r.returncode == 0, r.stderr
  applied, faults = r.stdout.split()
  return int(applied), int(faults)


@pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc (Linux)")
def test_retain_stops_per_call_page_faults():
  applied_sys, faults_sys = _faults("system")
  applied_ret, faults_ret = _faults("retain")
  assert (applied_sys, applied_ret) == (0, 1)
  # glibc's defaults: each call maps its temporaries afresh (64 MiB = 16k pages of 4 KiB).
  assert faults_sys >= 4 * 16_000, faults_sys
  # retained: the pages of earlier calls are reused (0 in steady state; margin: one late call
  # that still grows the heap, seen now and then).
  assert faults_ret <= faults_sys // 2, (faults_ret, faults_sys)


def test_unknown_mode_is_a_config_error():
  with pytest.raises(ConfigError, match="train.host_malloc='tcmalloc' must be one of"):
    host_memory.configure("tcmalloc")


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("tpu", False),
                                                 ("cuda,cpu", False), ("", None)])
def test_auto_follows_jax_platforms(monkeypatch, platforms, expected):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  got = host_memory.cpu_is_the_accelerator()
  if expected is None:  # unset: decided by which accelerator plugins are installed
    import importlib.util
    expected = importlib.util.find_spec("libtpu") is None and all(
        importlib.util.find_spec(m) is None for m in host_memory._ACCELERATOR_MODULES)
  assert got is expected
