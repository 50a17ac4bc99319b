"""`bepa-train` refuses bad configs with one clear line, exit 2, before compiling anything."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(*args, devices=8, timeout=120):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "bepa_jax.train", *args], capture_output=True,
                        text=True, env=env, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("override, expected", [
    ("--config.train.global_batch=30", "train.global_batch=30"),
    ("--config.train.stepz=3", "unknown config key 'train.stepz'"),
    ("--config.mesh.data=3", "does not match the 8 devices"),
    ("--config.loss.temperature=0", "loss.temperature must be > 0"),
    ("--config.loss.temperature=-0.1", "loss.temperature must be > 0"),
    ("--config.model.family=gpt", "model.family='gpt' is not one of"),
    ("--config.train.host_malloc=jemalloc", "train.host_malloc='jemalloc' must be one of"),
])
def test_bad_config_is_one_line_error(tmp_path, override, expected):
  wd = tmp_path / "wd"
  r = _run("--workdir", str(wd), override)
  assert r.returncode == 2, r.stderr
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, r.stderr
  assert lines[0].startswith("bepa-train: error:") and expected in lines[0], lines[0]
  assert not (wd / "tokenizer").exists()  # nothing was built


def test_missing_workdir_flag():
  r = _run()
  assert r.returncode == 2 and "--workdir is required" in r.stderr
