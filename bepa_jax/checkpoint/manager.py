"""Checkpoints: an Orbax CheckpointManager around the train state, the data position and the config.

Layout (local path or gs://bucket/...; Orbax/TensorStore write both):

  WORKDIR/checkpoints/<step>/state   params, opt_state, step (sharded arrays, OCDBT)
  WORKDIR/checkpoints/<step>/meta    JSON: time, config, data_state, rng, mesh, metrics, #params

Why each piece is enough for an exact resume: dropout RNG is fold_in(key(train.seed), step) and
the batch of step s is a pure function of s (data/pipeline.py), so the state plus the step
reproduce the run bit for bit. `data_state` records the pipeline position anyway, so that a
stateful pipeline can extend it later (see `data_state`).

Safety: Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-save leaves a `*.orbax-checkpoint-tmp*` directory that is never listed (we warn and
remove it). On gs://, where renames are not atomic, Orbax marks complete steps with
commit_success.txt instead. Once a save has finished, <step>/checksums.json records the size and
SHA-256 of each of its files (checkpoint/integrity.py); every restore verifies them first. A
checkpoint that fails (a flipped bit, a truncated copy, a lost file) or cannot be read is
skipped with one warning line and the previous one is used. A state whose loss is NaN/Inf is
never kept as a checkpoint; a background save that fails (disk full) stops training at once.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import signal
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from bepa_jax.config import validate as config_lib
from bepa_jax.checkpoint import integrity
from bepa_jax.data.pipeline import Pipeline
from bepa_jax.errors import BepaError, ConfigError, one_line

log = logging.getLogger("bepa")

SUBDIR = "checkpoints"
# Config keys that fix the shapes / tree structure of the saved state (and what token ids mean).
SHAPE_KEYS = ("model.family", "model.vocab_size", "model.hidden_size", "model.num_layers",
              "model.num_heads", "model.intermediate_size", "model.max_position_embeddings",
              "model.type_vocab_size", "model.scan_layers", "loss.learn_temperature",
              "loss.projector_layers", "loss.projector_dim", "loss.predictor_layers",
              "loss.predictor_dim", "tokenizer.path", "tokenizer.kind", "tokenizer.vocab_size",
              "tokenizer.model_type")
# Keys whose value may change but whose on/off state fixes the tree (EMA copy, clip state).
SWITCH_KEYS = ("loss.ema_decay", "optim.grad_clip_norm")
# Orbax splits the write of a replicated array over its replicas; below this many bytes per
# slice that only costs a compiled slice per device and shape (seconds on CPU), so don't.
MIN_REPLICA_SLICE_BYTES = 1 << 20
LOSS_KEYS = ("loss", "mlm_loss", "contrastive_loss", "grad_norm")


class NonFiniteLossError(BepaError, FloatingPointError):
  """Training diverged: a loss (or the gradient norm) is NaN or Inf. Nothing was saved."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def directory(workdir: str) -> epath.Path:
  """WORKDIR/checkpoints (WORKDIR itself when it already is one)."""
  path = epath.Path(workdir)
  return path if path.name == SUBDIR else path / SUBDIR


def config_value(tree: dict, dotted: str):
  node = tree
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def config_conflicts(saved: dict, new: dict) -> list[str]:
  """'key: old -> new' for every structural key that differs between two config dicts."""
  show = lambda k: f"{k}: {config_value(saved, k)!r} -> {config_value(new, k)!r}"
  on = lambda v: bool(v) and float(v) > 0
  return ([show(k) for k in SHAPE_KEYS if config_value(saved, k) != config_value(new, k)] +
          [show(k) + " (switches part of the state on/off)" for k in SWITCH_KEYS
           if on(config_value(saved, k)) != on(config_value(new, k))])


def check_finite(metrics: dict, step: int) -> None:
  """Raises NonFiniteLossError naming the step and every non-finite loss."""
  bad = [f"{k}={metrics[k]}" for k in LOSS_KEYS if k in metrics and not np.isfinite(metrics[k])]
  if bad:
    raise NonFiniteLossError(
        f"non-finite loss at step {step}: {', '.join(bad)}; training stopped, no diverged state "
        f"was kept as a checkpoint (lower optim.learning_rate or check the data, then rerun to "
        f"resume)", step)


def data_state(pipeline: Pipeline, step: int) -> dict:
  """The input position to store (the step and the data fingerprint; data/pipeline.py)."""
  return dict(pipeline.state_dict(step))


def restore_data_state(pipeline: Pipeline, restored: "Restored", config) -> None:
  """Checks the saved input position against this run's data: a resume on other data stops
  with one line naming the changed keys, unless data.continue_on_new_data (then the new
  stream starts at the restored step, and that is logged)."""
  allow = bool(config.data.continue_on_new_data)
  changes = pipeline.verify_state(dict(restored.meta.get("data_state", {}),
                                       next_step=restored.step), continue_on_new_data=allow)
  if changes:
    log.warning("data.continue_on_new_data=True: the data changed since step %d (%s); the new "
                "data stream starts at its position 0 at step %d", restored.step,
                "; ".join(changes), restored.step)
  elif allow:
    log.info("data.continue_on_new_data=True, but the data is unchanged: resuming its position")


def _all_processes(ok: bool) -> bool:
  """True only if `ok` on every process (all must restore the same step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _register_array_handler() -> None:
  """jax.Array handler with MIN_REPLICA_SLICE_BYTES (Orbax warns when overriding: hush it)."""
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)
  finally:
    absl_log.setLevel(level)


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  meta: dict


def _drop_failed_read_echoes() -> None:
  """After a damaged checkpoint's read failed (reported once, by the caller), its read
  coroutines that are collected unfinished, which can be long after the restore returned,
  reach sys.unraisablehook ("Exception ignored in" with a traceback on stderr): those are
  dropped for the rest of the process; other unraisable exceptions still print."""
  import sys
  previous = sys.unraisablehook
  if getattr(previous, "_bepa_failed_reads", False):
    return

  def hook(unraisable):
    if "while reading array index" in str(unraisable.exc_value):
      return
    previous(unraisable)

  hook._bepa_failed_reads = True
  sys.unraisablehook = hook


@contextlib.contextmanager
def quiet_reads():
  """Silences the loggers that print a traceback per file of a damaged checkpoint while Orbax
  tries it (asyncio, absl): its failure is reported once, by the caller. After a failure, the
  failed read's late echoes are dropped too (`_drop_failed_read_echoes`)."""
  import gc
  loggers = [logging.getLogger(n) for n in ("asyncio", "absl")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  try:
    yield
  except BaseException:
    _drop_failed_read_echoes()
    raise
  finally:
    gc.collect()
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def verify_step(directory: epath.Path, step: int) -> integrity.Verdict:
  """The checksums verdict of one step (process 0 reads; the others trust it, see
  `_all_processes`)."""
  if jax.process_index() != 0:
    return integrity.Verdict(True, checked=False)
  try:
    return integrity.verify(directory / str(step))
  except OSError as e:  # unreadable file, permissions: as bad as a mismatch
    return integrity.Verdict(False, f"{type(e).__name__}: {one_line(e)}")


def _disk_full(error: BaseException) -> bool:
  """Whether an Orbax/TensorStore error chain is ENOSPC/EDQUOT (TensorStore reports it as a
  ValueError 'RESOURCE_EXHAUSTED: ... No space left on device [os_error_code=28]')."""
  import errno
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(error)
    if "No space left on device" in text or "Disk quota exceeded" in text:
      return True
    error = error.__cause__ or error.__context__
  return False


class _BackgroundErrors(logging.Filter):
  """While this process writes checkpoints: Orbax's writer threads log each failure with a
  traceback per file, and TensorStore's callbacks print 'Event loop is closed' tracebacks
  after it. Both are kept off the console; the first message is kept, and `poll` stops
  training with one line (so nothing Orbax reports is lost)."""

  def __init__(self):
    super().__init__()
    self.first: str | None = None
    self._hook = None

  def filter(self, record) -> bool:
    if "orbax" in record.pathname and record.levelno >= logging.ERROR:
      if self.first is None:
        self.first = record.getMessage()
      return False
    return True

  def _unraisable(self, unraisable) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and \
        "Event loop is closed" in str(unraisable.exc_value):
      return
    self._hook(unraisable)

  def install(self) -> None:
    import sys
    logging.getLogger("absl").addFilter(self)
    self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable

  def remove(self) -> None:
    import sys
    logging.getLogger("absl").removeFilter(self)
    if self._hook is not None and sys.unraisablehook == self._unraisable:
      sys.unraisablehook = self._hook


def _free_bytes(path: epath.Path) -> int | None:
  """Free bytes of a local directory's file system (None for gs:// and the like)."""
  import os
  import shutil
  local = str(path)
  if "://" in local:
    return None
  while not os.path.exists(local):
    local = os.path.dirname(local) or "."
  return shutil.disk_usage(local).free


def _mib(n: float) -> str:
  return f"{n / 2**20:,.1f} MiB"


class Checkpointer:
  """Saves/restores a workdir's checkpoints; decides when to save; catches SIGTERM."""

  def __init__(self, workdir: str, ckpt_cfg=None, *, read_only: bool = False):
    self.directory = directory(workdir)
    _register_array_handler()
    self._drop_incomplete(remove=not read_only)
    save_policies, keep = [], [policies.LatestN(n=int(ckpt_cfg.keep) if ckpt_cfg else None)]
    if ckpt_cfg is not None:
      config_lib.validate_checkpoint(ckpt_cfg)
      if int(ckpt_cfg.every_steps) > 0:
        save_policies.append(policies.FixedIntervalPolicy(int(ckpt_cfg.every_steps)))
      if float(ckpt_cfg.every_minutes) > 0:  # decided on process 0, broadcast to all
        save_policies.append(policies.ContinuousCheckpointingPolicy(
            minimum_interval_secs=max(int(round(60 * float(ckpt_cfg.every_minutes))), 1)))
      if ckpt_cfg.keep_best_metric:
        name, lower = ckpt_cfg.keep_best_metric, ckpt_cfg.keep_best_mode == "min"
        worst = float("inf") if lower else float("-inf")  # a save without the metric
        keep.append(policies.BestN(get_metric_fn=lambda m: m.get(name, worst), n=1, reverse=lower,
                                   keep_checkpoints_without_metrics=False))
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    if read_only:  # Orbax warns that a read-only manager is read-only: not news to a reader
      absl_log.setLevel(logging.ERROR)
    try:
      self._open(save_policies, keep, ckpt_cfg, read_only)
    finally:
      absl_log.setLevel(level)
    self._closed = False
    self._errors = _BackgroundErrors()
    if not read_only:
      self._errors.install()
    atexit.register(self.close)  # also on an error exit: no Orbax thread outlives the interpreter
    self._preempted = False
    self._saved_this_run: set[int] = set()
    self._unverified = None  # the last saved step until the next step's loss shows it is finite
    self._unsummed: list[int] = []  # saved steps whose checksums are not written yet
    self._save_bytes = 0

  def _open(self, save_policies, keep, ckpt_cfg, read_only: bool) -> None:
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy(save_policies),
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=bool(ckpt_cfg.async_save) if ckpt_cfg else False,
        read_only=read_only, create=not read_only,
        save_root_metadata=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  # ------------------------------------------------------------------ listing
  def _drop_incomplete(self, remove: bool) -> None:
    """Warns about (and removes) the temporary directories of interrupted saves. Synchronous:
    Orbax's own cleanup runs in a thread that can outlive a process exiting on a config error."""
    if jax.process_index() != 0 or not self.directory.exists():
      return
    for path in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
      log.warning("checkpoint %s is incomplete (a save was interrupted): skipped%s", path,
                  ", removed" if remove else "")
      if remove:
        path.rmtree()

  def steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def saved_config(self) -> dict | None:
    """The config of the newest checkpoint whose metadata can be read, or None."""
    for step in reversed(self.steps()):
      try:
        return self.meta(step)["config"]
      except Exception:  # unreadable: restore_latest() warns about it
        continue
    return None

  def check_config(self, config) -> None:
    """ConfigError if the workdir holds checkpoints of a differently shaped model."""
    saved = self.saved_config()
    if saved is None:
      return
    diff = config_conflicts(saved, json.loads(config.to_json_best_effort()))
    if diff:
      raise ConfigError(
          f"{self.directory} holds checkpoints of another model ({'; '.join(diff)}): use a new "
          f"--workdir or the saved values")

  # ------------------------------------------------------------------ restore
  def restore_latest(self, abstract_state) -> Restored | None:
    """Restores the newest readable checkpoint into `abstract_state` (ShapeDtypeStructs carrying
    the target shardings, so any mesh works). None if there is none; raises if all are broken."""
    steps = self.steps()
    errors = []
    for step in reversed(steps):
      verdict = verify_step(self.directory, step)
      error = None if verdict.ok else verdict.problem
      if verdict.ok and not verdict.checked and jax.process_index() == 0:
        log.warning("checkpoint %s/%d: %s", self.directory, step, verdict.problem)
      if error is None:
        try:
          with quiet_reads():
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(state_items(abstract_state)),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001  (a truncated or foreign directory)
          error = f"{type(e).__name__}: {one_line(e)[:300]}"
      if _all_processes(error is None):
        return Restored(step, out.state, out.meta)
      error = error or "failed on another process"
      errors.append(f"{step}: {error}")
      log.warning("checkpoint %s/%d is damaged or unreadable (%s): skipped, trying the previous "
                  "one", self.directory, step, error)
    if steps:  # never start from scratch over existing checkpoints: keep-last-K would drop them
      raise BepaError(f"none of the checkpoints in {self.directory} can be read "
                      f"({'; '.join(errors)}); move them away to start from scratch")
    return None

  # ------------------------------------------------------------------ save
  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def check(self, metrics: dict, step: int) -> None:
    """check_finite for the metrics logged at `step` (computed from the state at step - 1).

    On failure the state at step - 1 is known to diverge: a checkpoint this run saved there is
    deleted (so a rerun resumes from the last good one), pending saves finish, and it raises."""
    try:
      check_finite(metrics, step)
    except NonFiniteLossError:
      self.discard_diverged(step - 1)
      raise

  def step_end(self, step: int, last_step: int, state, step_metrics, *, config, pipeline,
               mesh=None, extra_metrics=None) -> bool:
    """Called once per step by every process: saves when due (every N steps, every T minutes,
    the last step, preemption). Returns True when the loop must stop (preempted; saved)."""
    self.poll()
    host = lambda: {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    metrics = None
    if self._unverified == step - 1:  # this step's loss is that of the state saved last step
      metrics = host()
      self.check(metrics, step)
      self._unverified = None
    preempted = self.reached_preemption(step)
    if not (preempted or step == last_step or self.should_save(step)):
      return False
    metrics = metrics or host()
    self.check(metrics, step)  # never save a diverged state
    metrics.update(extra_metrics or {})
    self.save(step, state, config=config, data=data_state(pipeline, step), metrics=metrics,
              mesh=mesh)
    self._unverified = step
    if preempted:
      self.wait()
      log.warning("preempted: saved checkpoint %d to %s; rerun the same command to resume",
                  step, self.directory)
    return preempted

  def save(self, step: int, state, *, config, data: dict, metrics: dict, mesh=None) -> None:
    """Asynchronous save of `state` at `step` (returns once the arrays are copied off device).

    `metrics` must already have passed `check_finite`."""
    meta = {
        "step": int(step), "time": time.time(),
        "config": json.loads(config.to_json_best_effort()),
        "data_state": data,
        "rng": {"seed": int(config.train.seed), "dropout": "fold_in(key(train.seed), step)"},
        "mesh": dict(mesh.shape) if mesh is not None else None,
        "process_count": jax.process_count(),
        "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    items = state_items(state)
    self._check_space(step, items)
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(items),
                                                    meta=ocp.args.JsonSave(meta)),
                      metrics=meta["metrics"], force=True)
    self._saved_this_run.add(int(step))
    self._unsummed.append(int(step))
    if not self.manager.is_saving_in_progress():  # a synchronous save: finished already
      self.poll()

  def _save_failed(self, error: BaseException) -> BepaError:
    """The one line for a failed background save (disk full: path, bytes needed, free)."""
    self._unsummed.clear()
    self._errors.first = None
    try:  # Orbax still lists the failed step: read what the directory really holds
      self.manager.reload()
    except Exception:  # noqa: BLE001
      pass
    latest = self.manager.latest_step()
    last = ("no checkpoint is complete yet" if latest is None else
            f"the last complete checkpoint is {latest}")
    if _disk_full(error):
      free = _free_bytes(self.directory)
      return BepaError(
          f"checkpoint save to {self.directory} failed: disk full (a checkpoint needs about "
          f"{_mib(self._save_bytes)}" + (f", {_mib(free)} free" if free is not None else "")
          + f"); training stopped, {last}; free space and rerun to resume")
    return BepaError(f"checkpoint save to {self.directory} failed ({type(error).__name__}: "
                     f"{one_line(error)[:300]}); training stopped, {last}")

  def _check_space(self, step: int, items) -> None:
    """Refuses a save the local disk cannot hold, naming the path and the bytes needed."""
    need = sum(x.nbytes for x in jax.tree.leaves(items)) // max(jax.process_count(), 1)
    self._save_bytes = need
    free = _free_bytes(self.directory)
    if free is not None and free < need:
      raise BepaError(f"no space for checkpoint {step} in {self.directory}: it needs about "
                      f"{_mib(need)}, the disk has {_mib(free)} free; training stopped (last "
                      f"checkpoint: {self.manager.latest_step()}); free space and rerun")

  def poll(self) -> None:
    """Raises (one line) if a background save failed; writes the checksums of finished saves.
    Called every step: a failed save stops training at once, not at the next save."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001  (Orbax re-raises the writer thread's error)
      raise self._save_failed(e) from None
    if self._errors.first is not None and not self.manager.is_saving_in_progress():
      raise self._save_failed(RuntimeError(self._errors.first))
    if self._unsummed and not self.manager.is_saving_in_progress():
      steps, self._unsummed = self._unsummed, []
      if jax.process_index() == 0:
        present = set(self.steps())
        for step in steps:
          if step in present:  # not already dropped by keep=N
            integrity.write(self.directory / str(step))

  def discard_diverged(self, step: int) -> None:
    """Deletes the checkpoint this run saved at `step` if the state saved there gave a
    non-finite loss: resuming from it would diverge again at once."""
    self.manager.wait_until_finished()
    if step in self._saved_this_run and step in self.steps():
      self.manager.delete(step)
      log.warning("deleted checkpoint %d: its state gives a non-finite loss", step)

  def wait(self) -> None:
    """Blocks until pending saves are written, checked and checksummed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001  (the writer thread's error, re-raised)
      raise self._save_failed(e) from None
    self.poll()

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      try:  # checksums of a save that finished; a failed one was already reported
        self.wait()
      except BepaError as e:
        log.warning("%s", e)
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001  (the failed save again)
        pass
      self._errors.remove()

  # ------------------------------------------------------------------ preemption
  def install_preemption_handler(self) -> None:
    """Single process: SIGTERM sets a flag checked once per step. Several processes: JAX's own
    preemption service (installed by jax.distributed.initialize) handles SIGTERM instead."""
    if jax.process_count() == 1:
      def handler(signum, frame):
        self._preempted = True
        log.warning("received signal %d: saving at the end of this step, then exiting", signum)
      signal.signal(signal.SIGTERM, handler)

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once a preemption notice arrived."""
    if jax.process_count() == 1:
      return self._preempted
    from jax.experimental import multihost_utils
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # preemption service not running
      return False


def state_items(state) -> dict:
  """The array fields of a TrainState (step, params, opt_state, ...; not tx, not None)."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if f.metadata.get("pytree_node", True) and getattr(state, f.name) is not None}


def restore_state(template, restored: Restored):
  """A TrainState whose arrays come from the checkpoint (tx and structure from `template`)."""
  return template.replace(**restored.state)
