"""The one reader of saved parameters: bepa-eval, bepa-export, bepa-transfer and bepa-sweep
read a training workdir's weights here, as host numpy, on any number of devices.

It reads the layout `store.Checkpointer` writes (WORKDIR/checkpoints/<step>/state, an Orbax
pytree of the TrainState's arrays) and restores only the `params` subtree: the optimizer
state (twice the size of the weights under AdamW) is never read.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from bepa_jax.errors import InputError, one_line

log = logging.getLogger("bepa")


def checkpoint_steps(workdir: str) -> tuple[str, list[int]]:
  """(checkpoint directory, its complete steps in increasing order)."""
  from bepa_jax.checkpoint import store
  ckpt = store.Checkpointer(workdir, None, read_only=True)
  try:
    return str(ckpt.directory), sorted(ckpt.steps())
  finally:
    ckpt.close()


def read_params(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, params) of checkpoint `step` (default: the newest good one) of a training workdir.

  Each candidate's checksums are verified first (integrity.py). Without `step`, a damaged or
  unreadable newest checkpoint is skipped with one warning line naming it and why, as training
  does; an explicitly requested one is an InputError."""
  directory, steps = checkpoint_steps(workdir)
  if not steps:
    raise InputError(f"{workdir}: no checkpoints (looked in {directory})")
  if step is not None and int(step) not in steps:
    raise InputError(f"{workdir}: no checkpoint at step {step} (have {', '.join(map(str, steps))})")
  candidates = [int(step)] if step is not None else list(reversed(steps))
  problems = []
  for s in candidates:
    problem = _problem(directory, s)
    if problem is None:
      try:
        return s, _restore_params(os.path.join(directory, str(s), "state"))
      except InputError:
        raise
      except Exception as e:  # noqa: BLE001  (a damaged file Orbax cannot parse)
        problem = f"{type(e).__name__}: {one_line(e)[:200]}"
    if step is not None:
      raise InputError(f"{directory}/{s}: checkpoint is damaged ({problem}); pick another "
                       f"--step (bepa-ckpt verify {workdir} lists the good ones)")
    problems.append(f"{s}: {problem}")
    log.warning("checkpoint %s/%d is damaged or unreadable (%s): skipped, using the previous "
                "one", directory, s, problem)
  raise InputError(f"{workdir}: every checkpoint is damaged ({'; '.join(problems)})")


def _problem(directory: str, step: int) -> str | None:
  """Why checkpoint `step` fails its checksums, or None (a checkpoint without them passes,
  with a warning)."""
  from bepa_jax.checkpoint import integrity
  try:
    v = integrity.verify(os.path.join(directory, str(step)))
  except OSError as e:
    return f"{type(e).__name__}: {e}"
  if v.ok and not v.checked:
    log.warning("checkpoint %s/%d: %s", directory, step, v.problem)
  return None if v.ok else v.problem


def _restore_params(path: str) -> dict:
  """Only the `params` subtree of a saved TrainState, as host numpy."""
  import jax
  import orbax.checkpoint as ocp
  from bepa_jax.checkpoint.quiet import quiet_reads
  ckptr = ocp.PyTreeCheckpointer()
  with quiet_reads():
    meta = ckptr.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None) or meta
    if not isinstance(tree, dict) or "params" not in tree:
      raise InputError(f"{path}: not a bepa-jax train state (no params in it)")
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
    item = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree["params"])}
    restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=item, restore_args={"params": as_numpy}, partial_restore=True))
  return restored["params"]
