"""The checkpoint store: an Orbax CheckpointManager around the train state, the data position and
the config. It saves, lists, restores and keeps; what to save when training misbehaves (a NaN
loss, a preemption notice) is the trainer's guard (bepa_jax/trainer/guard.py).

Layout (local path or gs://bucket/...; Orbax/TensorStore write both):

  WORKDIR/checkpoints/<step>/state   params, opt_state, step (sharded arrays, OCDBT)
  WORKDIR/checkpoints/<step>/meta    JSON: time, config, data_state, rng, mesh, metrics, #params

Why each piece is enough for an exact resume: dropout RNG is fold_in(key(train.seed), step) and
the batch of step s is a pure function of s (data/pipeline.py), so the state plus the step
reproduce the run bit for bit. `data_state` (a plain dict the trainer gets from its pipeline)
records the pipeline position anyway, so that a stateful pipeline can extend it later.

Safety: Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-save leaves a `*.orbax-checkpoint-tmp*` directory that is never listed (we warn and
remove it). On gs://, where renames are not atomic, Orbax marks complete steps with
commit_success.txt instead. Once a save has finished, <step>/checksums.json records the size and
SHA-256 of each of its files (checkpoint/integrity.py); every restore verifies them first. A
checkpoint that fails (a flipped bit, a truncated copy, a lost file) or cannot be read is
skipped with one warning line and the previous one is used. A background save that fails (disk
full) stops training at once.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from bepa_jax.checkpoint import integrity, quiet
from bepa_jax.errors import BepaError, ConfigError, one_line
from bepa_jax.model import SHAPE_FIELDS

log = logging.getLogger("bepa")

SUBDIR = "checkpoints"
# Config keys that fix the shapes / tree structure of the saved state (and what token ids mean).
SHAPE_KEYS = tuple(f"model.{f}" for f in SHAPE_FIELDS) + (
    "model.scan_layers", "loss.learn_temperature", "loss.projector_layers", "loss.projector_dim",
    "loss.predictor_layers", "loss.predictor_dim", "tokenizer.path", "tokenizer.kind",
    "tokenizer.vocab_size", "tokenizer.model_type")
# Keys whose value may change but whose on/off state fixes the tree (EMA copy, clip state).
SWITCH_KEYS = ("loss.ema_decay", "optim.grad_clip_norm")
# Orbax splits the write of a replicated array over its replicas; below this many bytes per
# slice that only costs a compiled slice per device and shape (seconds on CPU), so don't.
MIN_REPLICA_SLICE_BYTES = 1 << 20


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


def _all_processes(ok: bool) -> bool:
  """True only if `ok` on every process (all must restore the same step)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _register_array_handler() -> None:
  """jax.Array handler with MIN_REPLICA_SLICE_BYTES (Orbax warns when overriding: hush it)."""
  with quiet.hushed("absl"):
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  meta: dict


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


def _policies(ckpt_cfg) -> tuple[list, list]:
  """(save policies, preservation policies) of checkpoint.* (already validated with the rest of
  the config: config/validate.py)."""
  save, keep = [], [policies.LatestN(n=int(ckpt_cfg.keep) if ckpt_cfg else None)]
  if ckpt_cfg is None:
    return save, keep
  if int(ckpt_cfg.every_steps) > 0:
    save.append(policies.FixedIntervalPolicy(int(ckpt_cfg.every_steps)))
  if float(ckpt_cfg.every_minutes) > 0:  # decided on process 0, broadcast to all
    save.append(policies.ContinuousCheckpointingPolicy(
        minimum_interval_secs=max(int(round(60 * float(ckpt_cfg.every_minutes))), 1)))
  if ckpt_cfg.keep_best_metric:
    name, lower = ckpt_cfg.keep_best_metric, ckpt_cfg.keep_best_mode == "min"
    worst = float("inf") if lower else float("-inf")  # a save without the metric
    keep.append(policies.BestN(get_metric_fn=lambda m: m.get(name, worst), n=1, reverse=lower,
                               keep_checkpoints_without_metrics=False))
  return save, keep


class Checkpointer:
  """Saves/restores a workdir's checkpoints; decides when a save is due (checkpoint.*)."""

  def __init__(self, workdir: str, ckpt_cfg=None, *, read_only: bool = False):
    self.directory = directory(workdir)
    _register_array_handler()
    self._drop_incomplete(remove=not read_only)
    save_policies, keep = _policies(ckpt_cfg)
    # Orbax warns that a read-only manager is read-only: not news to a reader
    with quiet.hushed("absl") if read_only else contextlib.nullcontext():
      self._open(save_policies, keep, ckpt_cfg, read_only)
    self._closed = False
    self._errors = quiet.BackgroundErrors()
    if not read_only:
      self._errors.install()
    atexit.register(self.close)  # also on an error exit: no Orbax thread outlives the interpreter
    self._saved_this_run: set[int] = set()
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

  def check_config(self, config: dict) -> None:
    """ConfigError if the workdir holds checkpoints of a differently shaped model. `config`:
    the run's config as JSON-able sections (config/specs.py Specs.to_dict)."""
    saved = self.saved_config()
    if saved is None:
      return
    diff = config_conflicts(saved, json.loads(json.dumps(config)))
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
        self._check_shapes(step, abstract_state)  # a healthy checkpoint of another shape
        try:
          with quiet.quiet_reads():
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

  def _check_shapes(self, step: int, abstract_state) -> None:
    """Raises ShapeMismatch when the saved params' shapes differ from `abstract_state`'s (read
    from Orbax's metadata, no array): that is another tokenizer or model, not damage."""
    try:
      with quiet.quiet_reads():
        meta = ocp.PyTreeCheckpointer().metadata(self.directory / str(step) / "state")
    except Exception:  # noqa: BLE001  (unreadable: restore names it)
      return
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None) or meta
    if not isinstance(tree, dict) or not isinstance(tree.get("params"), dict):
      return
    shapes = lambda t: {jax.tree_util.keystr(k): tuple(getattr(v, "shape", ()))
                        for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
    saved, built = shapes(tree["params"]), shapes(state_items(abstract_state)["params"])
    for key in sorted(saved.keys() & built.keys()):
      if saved[key] != built[key]:
        raise ShapeMismatch(self.directory, step, key, saved[key], built[key])

  # ------------------------------------------------------------------ save
  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, *, config: dict, data: dict, metrics: dict, mesh=None) -> None:
    """Asynchronous save of `state` at `step` (returns once the arrays are copied off device).

    `data` is the input position (the pipeline's state_dict); `metrics` must be finite (the
    trainer's guard checks them: trainer/guard.py)."""
    meta = {
        "step": int(step), "time": time.time(),
        "config": json.loads(json.dumps(config)),
        "data_state": data,
        "rng": {"seed": int(config["train"]["seed"]), "dropout": "fold_in(key(train.seed), step)"},
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

  def discard(self, step: int) -> bool:
    """Deletes checkpoint `step` if this run saved it (once pending saves are finished);
    returns whether it did. A checkpoint of an earlier run is never touched."""
    self.manager.wait_until_finished()
    if step in self._saved_this_run and step in self.steps():
      self.manager.delete(step)
      return True
    return False

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


class ShapeMismatch(ConfigError):
  """A healthy checkpoint whose parameters have other shapes than this run's (another tokenizer
  or model): nothing is wrong with it, and nothing is changed."""

  def __init__(self, directory, step: int, key: str, saved: tuple, built: tuple):
    self.directory, self.step, self.key, self.saved, self.built = (
        directory, step, key, saved, built)
    super().__init__(f"checkpoint {directory}/{step} holds params{key} of shape {saved} but "
                     f"this run builds {built}: it was saved with another model or tokenizer "
                     f"(nothing was changed)")


def state_items(state) -> dict:
  """The array fields of a TrainState (step, params, opt_state, ...; not tx, not None)."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if f.metadata.get("pytree_node", True) and getattr(state, f.name) is not None}


def restore_state(template, restored: Restored):
  """A TrainState whose arrays come from the checkpoint (tx and structure from `template`)."""
  return template.replace(**restored.state)
