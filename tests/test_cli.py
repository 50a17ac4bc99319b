"""`bepa-train` refuses bad configs with one clear line, exit 2, before compiling anything."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _run(*args, devices=8, timeout=120):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "bepa_jax.cli.train", *args], capture_output=True,
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


@pytest.mark.parametrize("case", ["syntax", "no_get_config", "workdir_is_file", "under_a_file",
                                  "not_a_tokenizer"])
def test_bad_files_are_one_line_errors(tmp_path, case):
  """A broken config file, a workdir that cannot be one, a tokenizer that is not one."""
  cfg = os.path.join(REPO, "configs", "quickstart.py")
  wd, extra = tmp_path / "wd", []
  if case == "syntax":
    (tmp_path / "c.py").write_text("def get_config(:\n")
    cfg, expected = str(tmp_path / "c.py"), f"{tmp_path}/c.py:1: syntax error"
  elif case == "no_get_config":
    (tmp_path / "c.py").write_text("x = 1\n")
    cfg, expected = str(tmp_path / "c.py"), f"{tmp_path}/c.py: defines no get_config()"
  elif case == "workdir_is_file":
    wd.write_text("keep me")
    expected = f"--workdir {wd}: exists and is not a directory"
  elif case == "under_a_file":
    (tmp_path / "f").write_text("keep me")
    wd, expected = tmp_path / "f" / "wd", f"{tmp_path}/f is not a directory"
  else:
    (tmp_path / "tok.model").write_text("not a model")
    extra = [f"--config.tokenizer.path={tmp_path}/tok.model"]
    expected = f"{tmp_path}/tok.model: not a sentencepiece model"
  r = _run("--config", cfg, "--workdir", str(wd), *extra)
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [l for l in r.stderr.splitlines() if "error" in l.lower() or "Traceback" in l]
  assert len(errors) == 1 and errors[0].startswith("bepa-train: error:"), r.stderr[-2000:]
  assert expected in errors[0], errors[0]
  if case in ("workdir_is_file", "under_a_file"):
    assert (wd if case == "workdir_is_file" else tmp_path / "f").read_text() == "keep me"
