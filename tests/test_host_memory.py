"""host_memory: glibc keeps freed memory, so XLA:CPU's per-step buffers stop page-faulting."""
import os
import statistics
import subprocess
import sys

import pytest

from bepa_jax import host_memory
from bepa_jax.errors import ConfigError
from tests.conftest import REPO

# The bench's tiny BEPA train step (XLA temporaries: 173 MiB), 3 steps to warm up; prints the
# minor page faults of each of the next 7 steps.
_PROBE = """
import resource, sys
from bepa_jax import host_memory
applied = host_memory.configure(sys.argv[1])
sys.path.insert(0, "bench")
import harness
compiled, state, batch, mesh, _, _ = harness.build_jax_step(harness.make_config("tiny"))
step = harness.step_runner(compiled, state, batch, mesh)
for _ in range(3):
  step()
faults = []
for _ in range(7):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(applied), *faults)
"""


def _faults(mode):
  """(applied, median minor page faults per step)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                     env=env, cwd=REPO, timeout=300)
  assert r.returncode == 0, r.stderr
  applied, *faults = (int(v) for v in r.stdout.split())
  return applied, statistics.median(faults)


@pytest.mark.skipif(host_memory._glibc() is None, reason="needs glibc (Linux)")
def test_retain_stops_per_call_page_faults():
  applied_sys, faults_sys = _faults("system")
  applied_ret, faults_ret = _faults("retain")
  assert (applied_sys, applied_ret) == (0, 1)
  # glibc's defaults: each step maps its temporaries afresh (~55k pages of 4 KiB here).
  assert faults_sys >= 20_000, faults_sys
  # retained: every step reuses the pages of the ones before (0 in practice).
  assert faults_ret <= 100, faults_ret


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
