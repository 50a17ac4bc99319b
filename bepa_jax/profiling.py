"""A jax.profiler trace of train steps [profile_start, profile_start + profile_steps).

Written by process 0 to WORKDIR/profile (open with TensorBoard's profile plugin, xprof or
Perfetto; `bench/profile_summary.py` sums op times from it). Start after compilation
(profile_start >= 2) so the trace shows steady-state steps, not the compiler.
"""
from __future__ import annotations

import logging
import os

import jax


log = logging.getLogger("bepa")


class StepProfiler:
  def __init__(self, train_cfg, workdir: str):
    self.start = int(train_cfg.profile_start)
    self.steps = int(train_cfg.profile_steps)
    self.dir = os.path.join(workdir, "profile")
    self.active = False
    self.enabled = self.steps > 0 and jax.process_index() == 0

  def before(self, step: int) -> None:
    """Call before running step `step` (0-based)."""
    if self.enabled and not self.active and self.start <= step < self.start + self.steps:
      jax.profiler.start_trace(self.dir)
      self.active = True
      log.info("profiling steps %d..%d -> %s", step, self.start + self.steps - 1, self.dir)

  def after(self, done: int, outputs) -> None:
    """Call after dispatching a step; `done` = steps completed. Waits for the device to finish."""
    if self.active and done >= self.start + self.steps:
      self.stop(outputs)

  def stop(self, outputs=None) -> None:
    if self.active:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      log.info("profile written to %s", self.dir)
