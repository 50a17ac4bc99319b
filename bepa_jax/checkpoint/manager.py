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
commit_success.txt instead. A finished checkpoint that cannot be read (truncated copy, lost
file) is skipped with a warning and the previous one is used. A state whose loss is NaN/Inf is
never kept as a checkpoint.
"""
from __future__ import annotations

import atexit
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

from bepa_jax import config as config_lib
from bepa_jax.data.pipeline import Pipeline
from bepa_jax.errors import BepaError, ConfigError

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


def restore_data_state(pipeline: Pipeline, restored: "Restored") -> None:
  """Checks the saved input position against this run's data: a resume on other data stops
  with one line (the batch is a function of the step, so the step is all it restores)."""
  pipeline.verify_state(restored.meta.get("data_state", {}))


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
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy(save_policies),
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=bool(ckpt_cfg.async_save) if ckpt_cfg else False,
        read_only=read_only, create=not read_only,
        save_root_metadata=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))
    self._closed = False
    atexit.register(self.close)  # also on an error exit: no Orbax thread outlives the interpreter
    self._preempted = False
    self._saved_this_run: set[int] = set()
    self._unverified = None  # the last saved step until the next step's loss shows it is finite

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
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state_items(abstract_state)),
            meta=ocp.args.JsonRestore()))
        ok, error = True, None
      except Exception as e:  # noqa: BLE001  (a truncated or foreign directory)
        ok, error = False, e
      if _all_processes(ok):
        return Restored(step, out.state, out.meta)
      errors.append(f"{step}: {type(error).__name__ if error else 'failed on another process'}")
      log.warning("checkpoint %s/%d cannot be read (%s): skipped, trying the previous one",
                  self.directory, step, str(error).splitlines()[0][:300] if error else
                  "failed on another process")
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
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(items),
                                                    meta=ocp.args.JsonSave(meta)),
                      metrics=meta["metrics"], force=True)
    self._saved_this_run.add(int(step))

  def discard_diverged(self, step: int) -> None:
    """Deletes the checkpoint this run saved at `step` if the state saved there gave a
    non-finite loss: resuming from it would diverge again at once."""
    self.manager.wait_until_finished()
    if step in self._saved_this_run and step in self.steps():
      self.manager.delete(step)
      log.warning("deleted checkpoint %d: its state gives a non-finite loss", step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self.manager.close()

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
