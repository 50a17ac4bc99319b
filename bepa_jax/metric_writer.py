"""Training metrics: a JSONL file (easy to load anywhere) and TensorBoard events.

Only process 0 writes; on other processes every call is a no-op. A run resumed at step N
redoes the steps after N that the previous run had already logged: those records are dropped
first (and TensorBoard purges them), so every step appears once.
"""
from __future__ import annotations

import json
import logging
import os

import jax


def drop_after(path: str, step: int) -> int:
  """Rewrites the JSONL file without records of steps > `step` (and a torn last line);
  returns how many lines were dropped. Atomic: a temporary file, then a rename."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        keep = int(json.loads(line)["step"]) <= step
      except (ValueError, KeyError, TypeError):
        keep = False  # a line cut by a crash mid-write
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(path + ".tmp", path)
  return dropped


class MetricWriter:
  def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int = 0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    dropped = drop_after(path, resume_step)
    if dropped:
      logging.getLogger("bepa").info("metrics.jsonl: dropped %d records after step %d (the "
                                     "resumed run redoes those steps)", dropped, resume_step)
    self._jsonl = open(path, "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=resume_step + 1 if resume_step else None)
    except ImportError:  # optional: JSONL is always written
      logging.warning("tensorboardX not installed: TensorBoard events are not written")

  def write(self, step: int, metrics: dict, prefix: str = "train"):
    if not self.enabled:
      return
    record = {"step": int(step), **{f"{prefix}/{k}": float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
      self._tb.flush()

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()
