"""Faults in saved checkpoints and metrics: bit flips, truncation, deleted files, a full disk.

Every checkpoint carries checksums of its files (checkpoint/integrity.py). These tests damage
a real tiny run's checkpoints and check that training, bepa-ckpt, bepa-eval's and bepa-export's
reader each detect it, say so in one line, and use the previous good checkpoint.
"""
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.conftest import REPO
from tests.helpers import tiny_config

RUN = {"train.steps": 4, "checkpoint.every_steps": 2, "checkpoint.keep": 10,
       "checkpoint.every_minutes": 0,
       "train.global_batch": 8, "train.log_every": 1}


def _env():
  path = os.environ.get("PYTHONPATH", "")
  return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
              PYTHONPATH=REPO + (os.pathsep + path if path else ""))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4 (and its tokenizer)."""
  from bepa_jax.trainer import loop
  wd = tmp_path_factory.mktemp("faults") / "run"
  loop.train(tiny_config(**RUN), str(wd))
  return wd


def _train_cli(tmp_path, workdir, **overrides):
  """bepa-train with the module's tiny config (a config file importing tests.helpers)."""
  cfg = tmp_path / "tiny_config.py"
  cfg.write_text("from tests.helpers import tiny_config\n\n\ndef get_config():\n"
                 f"  return tiny_config(**{dict(RUN)!r})\n")
  return [sys.executable, "-m", "bepa_jax.cli.train", "--config", str(cfg), "--workdir",
          str(workdir), *[f"--config.{k}={v}" for k, v in overrides.items()]]


def _copy(run, tmp_path):
  wd = tmp_path / "wd"
  shutil.copytree(run, wd)
  return wd


def _files(step_dir):
  return sorted(os.path.relpath(os.path.join(r, n), step_dir)
                for r, _, names in os.walk(step_dir) for n in names)


def _flip(path, seed=0):
  """Flips one bit of a file at a random position."""
  data = bytearray(open(path, "rb").read())
  pos = np.random.default_rng(seed).integers(len(data))
  data[pos] ^= 1 << int(np.random.default_rng(seed + 1).integers(8))
  open(path, "wb").write(bytes(data))


def _state_file(step_dir):
  """The largest file of the saved arrays (the one a bad disk is most likely to hit)."""
  files = [f for f in _files(step_dir) if f.startswith("state/")]
  return max(files, key=lambda f: os.path.getsize(os.path.join(step_dir, f)))


def _ckpt(*args):
  return subprocess.run([sys.executable, "-m", "bepa_jax.cli.ckpt", *map(str, args)],
                        capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)


def test_every_checkpoint_has_checksums_and_a_bit_flip_in_any_file_is_found(run, tmp_path):
  from bepa_jax.checkpoint import integrity
  step_dir = run / "checkpoints" / "4"
  assert integrity.verify(step_dir).ok and integrity.verify(step_dir).checked
  listed = json.loads((step_dir / "checksums.json").read_text())["files"]
  assert sorted(listed) == [f for f in _files(step_dir) if f != "checksums.json"]
  for k, name in enumerate(_files(step_dir)):  # every file, checksums.json included
    copy = tmp_path / f"c{k}"
    shutil.copytree(step_dir, copy)
    _flip(copy / name, seed=k)
    verdict = integrity.verify(copy)
    assert not verdict.ok, name
    assert verdict.problem.startswith(name), verdict.problem


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_training_resumes_from_the_previous_checkpoint(run, tmp_path, caplog, damage):
  from bepa_jax.trainer import build as build_lib
  from bepa_jax.checkpoint import store
  wd = _copy(run, tmp_path)
  step_dir = wd / "checkpoints" / "4"
  target = step_dir / (_state_file(step_dir) if damage != "delete" else "state/_METADATA")
  if damage == "flip":
    _flip(target)
  elif damage == "truncate":
    os.truncate(target, os.path.getsize(target) // 2)
  else:
    os.remove(target)
  config = tiny_config(**{**RUN, "train.steps": 6})
  with caplog.at_level(logging.WARNING, logger="bepa"):
    job = build_lib.build(config, str(wd), ckpt=store.Checkpointer(str(wd), config.checkpoint))
  assert int(job.state.step) == 2
  warnings = [r.getMessage() for r in caplog.records if "checkpoints/4" in r.getMessage()]
  assert len(warnings) == 1 and "damaged or unreadable" in warnings[0], caplog.text
  rel = os.path.relpath(target, step_dir)
  assert rel in warnings[0], warnings[0]
  assert "Traceback" not in caplog.text


def test_bepa_ckpt_verify_list_and_show_report_damage(run, tmp_path):
  wd = _copy(run, tmp_path)
  r = _ckpt("verify", wd)
  assert r.returncode == 0, r.stderr
  assert "2 of 2 checkpoints verified, 0 damaged" in r.stdout, r.stdout
  step_dir = wd / "checkpoints" / "4"
  name = _state_file(step_dir)
  _flip(step_dir / name)
  os.truncate(wd / "checkpoints" / "2" / _state_file(wd / "checkpoints" / "2"), 10)
  r = _ckpt("verify", wd)
  assert r.returncode == 1
  assert f"DAMAGED: {name} does not match its checksum" in r.stdout, r.stdout
  assert "2 damaged" in r.stdout
  assert r.stderr.count("\n") == 1 and "2 damaged checkpoint(s)" in r.stderr, r.stderr
  r = _ckpt("list", wd)
  assert r.returncode == 0 and r.stdout.count("DAMAGED") == 2, r.stdout
  assert "truncated or changed" in r.stdout
  r = _ckpt("show", wd, "--step", 4)
  assert "checksums   DAMAGED" in r.stdout, r.stdout


def test_bepa_ckpt_on_a_plain_file_is_one_line(tmp_path):
  f = tmp_path / "not_a_workdir"
  f.write_text("x")
  for command in ("list", "verify", "show"):
    r = _ckpt(command, f)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"bepa-ckpt: error: {f} is a file, not a workdir or " \
                               f"checkpoints directory", r.stderr


def test_eval_and_export_reader_falls_back_or_refuses(run, tmp_path, caplog):
  from bepa_jax.checkpoint import reader
  from bepa_jax.errors import InputError
  wd = _copy(run, tmp_path)
  step_dir = wd / "checkpoints" / "4"
  _flip(step_dir / _state_file(step_dir))
  with caplog.at_level(logging.WARNING, logger="bepa"):
    step, params = reader.read_params(str(wd))
  assert step == 2 and "checkpoints/4 is damaged" in caplog.text
  with pytest.raises(InputError, match=r"checkpoints/4: checkpoint is damaged \(state/"):
    reader.read_params(str(wd), 4)
  out = tmp_path / "hf"
  r = subprocess.run([sys.executable, "-m", "bepa_jax.cli.export", "--workdir", str(wd),
                      "--out", str(out)], capture_output=True, text=True, env=_env(), cwd=REPO,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "checkpoints/4 is damaged" in r.stderr and "Traceback" not in r.stderr + r.stdout
  r = subprocess.run([sys.executable, "-m", "bepa_jax.cli.export", "--workdir", str(wd),
                      "--step", "4", "--out", str(tmp_path / "hf4")], capture_output=True,
                     text=True, env=_env(), cwd=REPO, timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and "checkpoint is damaged" in r.stderr
  from bepa_jax.data import corpus
  rows = corpus.load_embedded().rows[:24]
  for j, lang in enumerate(("en", "de")):
    (tmp_path / f"p.{lang}").write_text("".join(r[j] + "\n" for r in rows), encoding="utf-8")
  r = subprocess.run([sys.executable, "-m", "bepa_jax.cli.eval", "--workdir", str(wd),
                      "--parallel", str(tmp_path / "p.en"), str(tmp_path / "p.de"), "--no-tsne",
                      "--out", str(tmp_path / "eval")], capture_output=True, text=True,
                     env=_env(), cwd=REPO, timeout=300)
  assert r.returncode == 0 and "Traceback" not in r.stderr + r.stdout, r.stderr[-2000:]
  assert [l for l in r.stderr.splitlines() if "checkpoints/4" in l] == [
      l for l in r.stderr.splitlines() if "checkpoints/4 is damaged" in l and "skipped" in l]
  assert "checkpoints/4 is damaged" in r.stderr


def test_metrics_have_each_step_once_after_a_resume(run, tmp_path):
  """The lost checkpoint 4 makes the resumed run redo steps 3-4: they are logged once."""
  from bepa_jax.trainer import loop
  wd = _copy(run, tmp_path)
  before = [json.loads(l)["step"] for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert before == [1, 2, 3, 4]
  shutil.rmtree(wd / "checkpoints" / "4")
  with open(wd / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "train/lo')  # a line torn by a crash
  loop.train(tiny_config(**{**RUN, "train.steps": 5}), str(wd))
  after = [json.loads(l)["step"] for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert after == [1, 2, 3, 4, 5]


def _unshare_tmpfs_works():
  r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m t /mnt"],
                     capture_output=True) if shutil.which("unshare") else None
  return r is not None and r.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _unshare_tmpfs_works(),
                                 reason="needs unshare -rm and tmpfs mounts")


@needs_tmpfs
def test_disk_full_before_a_save_is_one_line(run, tmp_path):
  """A workdir on a 256 KiB tmpfs: the first checkpoint does not fit; bepa-train says so."""
  tok = run / "tokenizer" / "spm.model"
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  train = [sys.executable, "-m", "bepa_jax.cli.train", "--workdir", str(mnt / "run"),
           f"--config.tokenizer.path={tok}",
           *[f"--config.{k}={v}" for k, v in RUN.items()]]
  script = f"mount -t tmpfs -o size=256k t {mnt} && exec {' '.join(train)}"
  r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                     env=_env(), cwd=REPO, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  err = r.stderr.strip().splitlines()
  assert "Traceback" not in r.stderr and err[-1].startswith("bepa-train: error: no space for "
                                                             "checkpoint 2 in "), err[-5:]
  assert f"{mnt}/run/checkpoints" in err[-1] and "MiB free" in err[-1]


@needs_tmpfs
def test_disk_full_during_a_background_save_stops_at_once(tmp_path):
  """The disk fills while an async save is being written: the next poll (every step) raises
  one line naming the path and the bytes needed, and no incomplete checkpoint is listed."""
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  script = textwrap.dedent(f"""
      import os, sys, time, jax, numpy as np
      from bepa_jax.trainer import build as build_lib
      from bepa_jax.trainer import loop
      from bepa_jax.checkpoint import store
      from bepa_jax.errors import BepaError
      from tests.helpers import tiny_config
      config = tiny_config(**{{"checkpoint.async_save": True}})
      job = build_lib.build(config, {str(tmp_path / "build")!r})
      rng = np.random.default_rng(0)  # dense values: nothing compresses away
      state = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype)
                           if x.dtype == np.float32 else x, job.state)
      ckpt = store.Checkpointer({str(mnt / "run")!r}, config.checkpoint)
      need = sum(x.nbytes for x in jax.tree.leaves(store.state_items(state)))
      free = os.statvfs({str(mnt)!r}).f_bavail * os.statvfs({str(mnt)!r}).f_frsize
      with open({str(mnt / "filler")!r}, "wb") as f:  # leave the estimate + 8 KiB free
        f.write(b"0" * (free - need - 8192))
      try:
        ckpt.save(2, state, config=job.config.to_dict(), data={{}}, metrics={{"loss": 1.0}})
        for _ in range(600):  # what the train loop does once per step
          ckpt.poll()
          if not ckpt.manager.is_saving_in_progress():
            ckpt.poll()
            break
          time.sleep(0.05)
        print("NO ERROR")
      except BepaError as e:
        print("ERROR", e)
      print("STEPS", ckpt.steps())
      """)
  r = subprocess.run(["unshare", "-rm", "sh", "-c",
                      f"mount -t tmpfs -o size=4m t {mnt} && exec {sys.executable} -c '"
                      + script.replace("'", "'\"'\"'") + "'"],
                     capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
  out = r.stdout
  assert "ERROR checkpoint save to" in out, (out, r.stderr[-3000:])
  line = next(l for l in out.splitlines() if l.startswith("ERROR"))
  assert f"{mnt}/run/checkpoints failed: disk full" in line and "needs about" in line, line
  assert "STEPS []" in out
  assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_torn_checkpoint_without_checksums_is_one_warning_not_a_flood(run, tmp_path):
  """An older-style checkpoint (no checksums.json) whose array files were cut by a partial
  copy: Orbax's failed read prints nothing; bepa-train warns once and resumes from step 2."""
  wd = _copy(run, tmp_path)
  step_dir = wd / "checkpoints" / "4"
  os.remove(step_dir / "checksums.json")
  for name in _files(step_dir):
    if name.startswith("state/ocdbt.process_0/d/"):
      os.truncate(step_dir / name, 3)
  r = subprocess.run(_train_cli(tmp_path, wd, **{"train.steps": 5}), capture_output=True,
                     text=True, env=_env(), cwd=REPO, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout + r.stderr
  assert "Traceback" not in out and "Event loop is closed" not in out, out[-3000:]
  about = [l for l in out.splitlines() if "checkpoints/4" in l]
  assert len(about) == 2, about  # "not verified" + "damaged or unreadable ... skipped"
  assert "not verified" in about[0] and "skipped" in about[1]
  assert "resumed from checkpoint step 2" in out


@needs_tmpfs
def test_workdir_on_a_read_only_file_system_is_one_line(tmp_path):
  mnt = tmp_path / "ro"
  mnt.mkdir()
  cmd = " ".join(_train_cli(tmp_path, mnt / "run"))
  r = subprocess.run(["unshare", "-rm", "sh", "-c",
                      f"mount -t tmpfs -o size=1m,ro t {mnt} && exec {cmd}"],
                     capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  assert r.stderr.strip() == f"bepa-train: error: --workdir {mnt / 'run'}: {mnt} is not " \
                             f"writable", r.stderr
