"""Checkpoints: exact resume after SIGKILL, SIGTERM preemption, another mesh, broken checkpoints,
NaN, config conflicts, `bepa-ckpt`. Real `python -m bepa_jax.cli.train` subprocesses on CPU.

One reference run (8 devices, checkpoints every 2 of 8 steps) is shared by the module; the
other tests copy its workdir. A persistent XLA cache keeps the repeated compiles cheap.
"""
import hashlib
import json
import logging
import os
import re
import random
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import REPO
from tests.helpers import tiny_config

STEPS, EVERY = 8, 2
TINY = {
    "model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 4,
    "model.intermediate_size": 64, "tokenizer.vocab_size": 400,
    "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,  # dropout on: RNG must resume too
    "data.max_length": 16, "data.max_predictions_per_seq": 3,
    "train.global_batch": 16, "train.log_every": 1, "optim.warmup_steps": 2,
    "optim.schedule": "linear", "checkpoint.every_steps": EVERY, "checkpoint.every_minutes": 0,
    "checkpoint.keep": 10,
    "data.packing": True,  # the default layout, also for the in-process runs of tiny_config
}


def _env(cache_dir, devices=8):
  path = os.environ.get("PYTHONPATH", "")
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
              PYTHONPATH=REPO + (os.pathsep + path if path else ""),
              JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _cmd(workdir, tokenizer, **overrides):
  cfg = {**TINY, "tokenizer.path": tokenizer, "train.steps": STEPS, **overrides}
  return [sys.executable, "-m", "bepa_jax.cli.train", "--workdir", str(workdir),
          *[f"--config.{k}={v}" for k, v in cfg.items()]]


def _run(ctx, workdir, devices=8, **overrides):
  return subprocess.run(_cmd(workdir, ctx["tokenizer"], **overrides), capture_output=True,
                        text=True, env=_env(ctx["cache"], devices), cwd=REPO, timeout=300)


def _run_until(ctx, workdir, step, sig, **overrides):
  """Starts a run and sends `sig` once it has logged `step`; returns (returncode, output)."""
  proc = subprocess.Popen(_cmd(workdir, ctx["tokenizer"], **overrides), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=_env(ctx["cache"]), cwd=REPO)
  lines, sent = [], False
  for line in proc.stdout:
    lines.append(line)
    if not sent and f" step {step}/" in line:
      proc.send_signal(sig)
      sent = True
  proc.wait(timeout=120)
  assert sent, f"the run ended before step {step}:\n{''.join(lines)[-3000:]}"
  return proc.returncode, "".join(lines)


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def _load(workdir, step):
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  tree = ocp.StandardCheckpointer().restore(path)
  return jax.tree.map(np.asarray, tree)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def _hashes(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        key = os.path.relpath(os.path.join(root, name), directory)
        out[key] = hashlib.md5(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
  """A tokenizer, the XLA cache and the uninterrupted reference run."""
  from bepa_jax.data import corpus, tokenizer
  base = tmp_path_factory.mktemp("ckpt")
  tok = tokenizer.train_sentencepiece(corpus.load_embedded().texts(), str(base / "tok"), 400)
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or base / "xla_cache"  # the run's (conftest)
  ctx = {"tokenizer": tok, "cache": cache, "ref": base / "ref"}
  r = _run(ctx, ctx["ref"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert _steps(ctx["ref"]) == [2, 4, 6, 8]
  return ctx


def _copy(ctx, tmp_path, keep_steps=None):
  wd = tmp_path / "wd"
  shutil.copytree(ctx["ref"], wd)
  for step in _steps(wd):
    if keep_steps is not None and step not in keep_steps:
      shutil.rmtree(wd / "checkpoints" / str(step))
  return wd


def test_kill_and_preempt_then_resume_is_bitwise_exact(ctx, tmp_path):
  """SIGKILL at a random step, rerun; SIGTERM at a later random step (saves, exits 0), rerun:
  the final parameters and optimizer state equal the uninterrupted run's, bit for bit. The
  interrupted runs build their batches in a data worker, the others in the training process."""
  wd = tmp_path / "wd"
  rng = random.Random()
  kill_at = rng.randint(3, 5)
  rc, out = _run_until(ctx, wd, kill_at, signal.SIGKILL, **{"data.workers": 1})
  assert rc == -signal.SIGKILL, out[-2000:]
  resumed_from = max(_steps(wd), default=0)  # an async save cut short by the kill is not listed
  assert resumed_from <= kill_at + 1

  term_at = rng.randint(resumed_from + 1, STEPS - 1)
  rc, out = _run_until(ctx, wd, term_at, signal.SIGTERM, **{"data.workers": 1})
  assert (f"resumed from checkpoint step {resumed_from}" in out) == (resumed_from > 0), out[-3000:]
  assert rc == 0, f"SIGTERM at step {term_at}: exit {rc}\n{out[-3000:]}"
  assert "preempted: saved checkpoint" in out, out[-3000:]
  preempted_at = int(out.split("preempted: saved checkpoint ")[1].split()[0])
  assert preempted_at >= term_at and preempted_at == _steps(wd)[-1]

  r = _run(ctx, wd)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from checkpoint step {preempted_at}" in r.stderr
  ref, got = _load(ctx["ref"], STEPS), _load(wd, STEPS)
  assert jax.tree.structure(ref) == jax.tree.structure(got)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(ref),
                        jax.tree.leaves(got)):
    assert a.dtype == b.dtype and np.array_equal(a, b), (
        f"{jax.tree_util.keystr(path[0])} differs (killed at {kill_at}, SIGTERM at {term_at})")


def test_restore_onto_another_mesh_continues_with_the_same_loss(ctx, tmp_path):
  """Saved on 8 devices, mesh (8,1,1); restored on 4 devices, mesh (2,2,1), from step 4."""
  wd = _copy(ctx, tmp_path, keep_steps={2, 4})
  r = _run(ctx, wd, devices=4, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from checkpoint step 4" in r.stderr
  assert "'data': 8, 'fsdp': 1" in r.stderr and "{'data': 2, 'fsdp': 2, 'tensor': 1}" in r.stderr
  ref, got = _losses(ctx["ref"]), _losses(wd)
  for step in range(5, STEPS + 1):
    np.testing.assert_allclose(got[step], ref[step], rtol=2e-5, err_msg=f"step {step}")


def test_incomplete_and_truncated_checkpoints_are_skipped(ctx, tmp_path, caplog):
  """A crash mid-save (tmp dir) and a truncated copy of step 8: resume from 6, with warnings."""
  from bepa_jax.trainer import build as build_lib
  from bepa_jax.checkpoint import store as checkpoint
  wd = _copy(ctx, tmp_path)
  shutil.copytree(wd / "checkpoints" / "8", wd / "checkpoints" / "10.orbax-checkpoint-tmp-1")
  for root, _, files in os.walk(wd / "checkpoints" / "8" / "state"):
    for name in files:  # an interrupted copy: every file of step 8's arrays is empty
      os.truncate(os.path.join(root, name), 0)
  config = tiny_config(**{**TINY, "tokenizer.path": ctx["tokenizer"], "train.steps": STEPS})
  with caplog.at_level(logging.WARNING, logger="bepa"):
    job = build_lib.build(config, str(wd), ckpt=checkpoint.Checkpointer(str(wd), config.checkpoint))
  assert int(job.state.step) == 6
  ref = _load(ctx["ref"], 6)["params"]
  assert all(np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(ref), jax.tree.leaves(job.state.params)))
  text = caplog.text
  assert "10.orbax-checkpoint-tmp-1 is incomplete" in text
  assert "checkpoints/8 is damaged or unreadable (state/_METADATA has 0 bytes" in text

  # every checkpoint broken: refuse, rather than start over and later delete them
  for step in (2, 4, 6):
    shutil.rmtree(wd / "checkpoints" / str(step) / "state")
  from bepa_jax.errors import BepaError
  with pytest.raises(BepaError, match="none of the checkpoints"):
    build_lib.build(config, str(wd), ckpt=checkpoint.Checkpointer(str(wd), config.checkpoint))


def test_nan_loss_stops_and_keeps_good_checkpoints(ctx, tmp_path):
  """lr=1e30 from step 8 on: the loss becomes non-finite; the run stops naming the step and
  the loss, checkpoints 2..8 are untouched, and no diverged state is left as a checkpoint."""
  wd = _copy(ctx, tmp_path)
  before = _hashes(wd / "checkpoints")
  r = _run(ctx, wd, **{"train.steps": 14, "optim.learning_rate": 1e30, "checkpoint.every_steps": 1})
  assert r.returncode == 2, r.stderr[-3000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("bepa-train: error:")]
  assert len(lines) == 1 and "non-finite loss at step" in lines[0], r.stderr[-3000:]
  assert "loss=nan" in lines[0] or "loss=inf" in lines[0]
  bad_step = int(lines[0].split("non-finite loss at step ")[1].split(":")[0])
  assert 8 < bad_step <= 14
  if bad_step - 1 > 8:  # the state saved at bad_step - 1 is the one that gave the NaN: removed
    assert f"deleted checkpoint {bad_step - 1}" in r.stderr, r.stderr[-3000:]
  after = _hashes(wd / "checkpoints")
  assert {k: v for k, v in after.items() if k.split(os.sep)[0] in {"2", "4", "6", "8"}} == before
  for step in _steps(wd):  # whatever was saved before the NaN showed up gives a finite loss
    assert step < bad_step
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_load(wd, step)["params"]))


def test_config_conflict_is_refused(ctx, tmp_path):
  wd = _copy(ctx, tmp_path, keep_steps={8})
  before = _hashes(wd)
  r = _run(ctx, wd, **{"model.hidden_size": 64, "model.num_layers": 3, "train.steps": 10})
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("bepa-train: error:"), r.stderr[-2000:]
  assert "model.hidden_size: 32 -> 64" in lines[0] and "model.num_layers: 2 -> 3" in lines[0]
  assert _hashes(wd) == before  # nothing written, config.json included


def test_bepa_ckpt_list_and_show(ctx):
  env = _env(ctx["cache"])
  cli = [sys.executable, "-m", "bepa_jax.cli.ckpt"]
  r = subprocess.run(cli + ["list", str(ctx["ref"])], capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr
  rows = [l.split() for l in r.stdout.splitlines()[1:]]
  assert [int(row[0]) for row in rows] == [2, 4, 6, 8]
  assert all(np.isfinite(float(row[3])) for row in rows)  # the loss column

  r = subprocess.run(cli + ["show", str(ctx["ref"]), "--step", "4"], capture_output=True,
                     text=True, env=env)
  assert r.returncode == 0, r.stderr
  fields = {l.split()[0]: l.split(None, 1)[1] for l in r.stdout.splitlines() if l[:1] != " "
            and len(l.split()) > 1}
  # the input position: the step, and the fingerprint of the data it was drawn from
  assert fields["step"] == "4"
  assert re.fullmatch(r"next_step 4, start_step 0, fingerprint [0-9a-f]{16}",
                      fields["data_state"]), fields["data_state"]
  assert fields["checksums"].startswith("verified"), fields["checksums"]
  n_params = sum(x.size for x in jax.tree.leaves(_load(ctx["ref"], 4)["params"]))
  assert fields["parameters"] == f"{n_params:,}"
  assert "model.hidden_size        32" in r.stdout and "saved" in fields

  r = subprocess.run(cli + ["show", str(ctx["ref"]), "--step", "5"], capture_output=True,
                     text=True, env=env)
  assert r.returncode == 2 and r.stderr.startswith("bepa-ckpt: error: no checkpoint at step 5")


def test_every_minutes_and_keep_best(tmp_path):
  """Time-based saves (every_minutes) and keep=1 plus the best checkpoint by `loss`."""
  import time
  import jax.numpy as jnp
  import optax
  from bepa_jax.training import state as train_state
  from bepa_jax.checkpoint import store as checkpoint
  cfg = tiny_config(**{"checkpoint.every_steps": 0, "checkpoint.every_minutes": 1 / 60,
                       "checkpoint.keep": 1, "checkpoint.keep_best_metric": "loss",
                       "checkpoint.async_save": False})
  ck = checkpoint.Checkpointer(str(tmp_path), cfg.checkpoint)
  state = train_state.TrainState(step=jnp.int32(0), params={"w": jnp.ones(3)},
                                 opt_state={"m": jnp.zeros(3)}, tx=optax.identity())
  save = lambda step, loss: ck.save(step, state, config=json.loads(cfg.to_json_best_effort()),
                                    data={"next_step": step},
                                    metrics={"loss": loss})
  assert ck.should_save(1)  # nothing saved yet
  save(1, 1.0)
  assert not ck.should_save(2)  # less than a second since the last save
  time.sleep(1.2)
  assert ck.should_save(3)
  save(3, 5.0)
  save(4, 3.0)
  ck.wait()
  assert ck.steps() == [1, 4]  # the best (loss 1.0) and the latest
  assert ck.meta(4)["data_state"] == {"next_step": 4}


@pytest.mark.parametrize("target", ["one_worker", "launcher"])
def test_sigterm_with_two_processes_agrees_on_the_step(ctx, tmp_path, target):
  """SIGTERM reaches one of two processes only: JAX's preemption sync point makes both save the
  same step and exit 0. SIGTERM to launch/local.py reaches both (forwarded): both save, the
  launcher exits 143 and no worker outlives it. Each builds its packed batches in a data worker
  (which a launcher's signal to the process group does not stop)."""
  import time
  wd, logs = tmp_path / "wd", tmp_path / "logs"
  cmd = _cmd(wd, ctx["tokenizer"], **{"train.steps": 500, "checkpoint.every_steps": 0,
                                      "data.workers": 1})
  launcher = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "launch", "local.py"), "--num_processes", "2",
       "--devices_per_process", "2", "--log_dir", str(logs), "--timeout_s", "240",
       "--env", f"JAX_COMPILATION_CACHE_DIR={ctx['cache']}",
       "--env", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0", "--", *cmd],
      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=_env(ctx["cache"]), cwd=REPO)
  deadline = time.monotonic() + 240
  log0 = logs / "worker_0.log"
  while not (log0.exists() and " step 3/" in log0.read_text(errors="replace")):
    assert launcher.poll() is None and time.monotonic() < deadline, (
        log0.read_text(errors="replace")[-3000:] if log0.exists() else "no log")
    time.sleep(0.5)
  with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as f:
    workers = [int(p) for p in f.read().split()]
  assert len(workers) == 2
  if target == "launcher":
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=120) == 143
    for pid in workers:  # reaped by the launcher: gone
      with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
  else:
    os.kill(workers[1], signal.SIGTERM)  # start order: worker 1 is the second child
    assert launcher.wait(timeout=120) == 0
  saved = []
  for k in (0, 1):
    text = (logs / f"worker_{k}.log").read_text(errors="replace")
    assert "preempted: saved checkpoint" in text, text[-3000:]
    saved.append(int(text.split("preempted: saved checkpoint ")[1].split()[0]))
  assert saved[0] == saved[1] and _steps(wd) == [saved[0]] and saved[0] < 500


def test_resume_on_other_data_is_refused_unless_asked(tmp_path, caplog):
  """Every key the stream depends on is checked on restore; data.continue_on_new_data accepts
  a change, restarts the data position at the restored step and keeps that on later resumes."""
  from bepa_jax.trainer import loop
  from bepa_jax.errors import ConfigError
  from bepa_jax.checkpoint import store as ckpt_lib
  from tests.helpers import tiny_config
  wd = str(tmp_path / "run")
  overrides = {"train.steps": 2, "checkpoint.every_steps": 2, "train.global_batch": 8}
  loop.train(tiny_config(**overrides), wd)
  for change, named in [({"data.seed": 9}, "data.seed: 0 -> 9"),
                        ({"train.global_batch": 16}, "train.global_batch: 8 -> 16"),
                        ({"data.mask_prob": 0.2}, "data.mask_prob: 0.15 -> 0.2"),
                        ({"data.max_length": 12}, "data.max_length: 16 -> 12")]:
    with pytest.raises(ConfigError, match=f"step 2 was trained on other data.*{named}"):
      loop.train(tiny_config(**{**overrides, "train.steps": 4, **change}), wd)
  new = {**overrides, "data.seed": 9, "train.steps": 4, "data.continue_on_new_data": True}
  with caplog.at_level(logging.WARNING, logger="bepa"):
    state, _ = loop.train(tiny_config(**new), wd)
  assert "the new data stream starts at its position 0 at step 2" in caplog.text
  assert int(jax.device_get(state.step)) == 4
  ckpt = ckpt_lib.Checkpointer(wd, read_only=True)
  assert ckpt.meta(4)["data_state"]["start_step"] == 2
  ckpt.close()
  # a later resume on the same new data, without the key, continues that stream
  state, _ = loop.train(tiny_config(**{**new, "train.steps": 6,
                                        "data.continue_on_new_data": False}), wd)
  assert int(jax.device_get(state.step)) == 6
