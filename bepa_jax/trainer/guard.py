"""The training loop's guard: what happens to checkpoints when training misbehaves.

Per step, once (`Guard.step_end`): a save when one is due (every N steps, every T minutes, the
last step, a preemption notice), never of a diverged state. A loss (or gradient norm) that is
NaN/Inf stops training with one line naming the step; the checkpoint this run saved from the
state that gave it is deleted, so a rerun resumes from the last good one. SIGTERM (a
preemption) saves at the end of the step and stops. On a resume, the data a checkpoint was
trained on is checked against this run's (`check_resumed_data`).

The checkpoints themselves are the store's (bepa_jax/checkpoint/store.py); this is policy.
"""
from __future__ import annotations

import logging
import signal

import jax
import numpy as np

from bepa_jax.checkpoint import store
from bepa_jax.errors import BepaError

log = logging.getLogger("bepa")

LOSS_KEYS = ("loss", "mlm_loss", "contrastive_loss", "grad_norm")


class NonFiniteLossError(BepaError, FloatingPointError):
  """Training diverged: a loss (or the gradient norm) is NaN or Inf. Nothing was saved."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def check_finite(metrics: dict, step: int) -> None:
  """Raises NonFiniteLossError naming the step and every non-finite loss."""
  bad = [f"{k}={metrics[k]}" for k in LOSS_KEYS if k in metrics and not np.isfinite(metrics[k])]
  if bad:
    raise NonFiniteLossError(
        f"non-finite loss at step {step}: {', '.join(bad)}; training stopped, no diverged state "
        f"was kept as a checkpoint (lower optim.learning_rate or check the data, then rerun to "
        f"resume)", step)


def check_resumed_data(pipeline, restored: store.Restored, config) -> None:
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


class Guard:
  """The loop's per-step checks around a checkpoint store: finite losses, saves, preemption."""

  def __init__(self, ckpt: store.Checkpointer, *, handle_preemption: bool = False):
    self.ckpt = ckpt
    self._preempted = False
    self._unverified = None  # the last saved step until the next step's loss shows it is finite
    if handle_preemption:
      self.install_preemption_handler()

  # ------------------------------------------------------------------ divergence
  def check(self, metrics: dict, step: int) -> None:
    """check_finite for the metrics logged at `step` (computed from the state at step - 1).

    On failure the state at step - 1 is known to diverge: a checkpoint this run saved there is
    deleted (so a rerun resumes from the last good one), pending saves finish, and it raises."""
    try:
      check_finite(metrics, step)
    except NonFiniteLossError:
      self.discard_diverged(step - 1)
      raise

  def discard_diverged(self, step: int) -> None:
    """Deletes the checkpoint this run saved at `step` if the state saved there gave a
    non-finite loss: resuming from it would diverge again at once."""
    if self.ckpt.discard(step):
      log.warning("deleted checkpoint %d: its state gives a non-finite loss", step)

  # ------------------------------------------------------------------ per step
  def step_end(self, step: int, last_step: int, state, step_metrics, *, config, pipeline,
               mesh=None, extra_metrics=None) -> bool:
    """Called once per step by every process: saves when due (every N steps, every T minutes,
    the last step, preemption). Returns True when the loop must stop (preempted; saved)."""
    self.ckpt.poll()
    host = lambda: {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    metrics = None
    if self._unverified == step - 1:  # this step's loss is that of the state saved last step
      metrics = host()
      self.check(metrics, step)
      self._unverified = None
    preempted = self.reached_preemption(step)
    if not (preempted or step == last_step or self.ckpt.should_save(step)):
      return False
    metrics = metrics or host()
    self.check(metrics, step)  # never save a diverged state
    metrics.update(extra_metrics or {})
    self.ckpt.save(step, state, config=config.to_dict(), data=dict(pipeline.state_dict(step)),
                   metrics=metrics, mesh=mesh)
    self._unverified = step
    if preempted:
      self.ckpt.wait()
      log.warning("preempted: saved checkpoint %d to %s; rerun the same command to resume",
                  step, self.ckpt.directory)
    return preempted

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
