"""The one reader of saved parameters: bepa-eval, bepa-export, bepa-transfer and bepa-sweep
read a training workdir's weights here, as host numpy, on any number of devices.

It reads the layout `manager.Checkpointer` writes (WORKDIR/checkpoints/<step>/state, an Orbax
pytree of the TrainState's arrays) and restores only the `params` subtree: the optimizer
state (twice the size of the weights under AdamW) is never read.
"""
from __future__ import annotations

import os

import numpy as np

from bepa_jax.errors import InputError


def checkpoint_steps(workdir: str) -> tuple[str, list[int]]:
  """(checkpoint directory, its complete steps in increasing order)."""
  from bepa_jax.checkpoint import manager
  ckpt = manager.Checkpointer(workdir, None, read_only=True)
  try:
    return str(ckpt.directory), sorted(ckpt.steps())
  finally:
    ckpt.close()


def read_params(workdir: str, step: int | None = None) -> tuple[int, dict]:
  """(step, params) of checkpoint `step` (default: the newest) of a training workdir."""
  import jax
  import orbax.checkpoint as ocp
  directory, steps = checkpoint_steps(workdir)
  if not steps:
    raise InputError(f"{workdir}: no checkpoints (looked in {directory})")
  if step is None:
    step = steps[-1]
  elif int(step) not in steps:
    raise InputError(f"{workdir}: no checkpoint at step {step} (have {', '.join(map(str, steps))})")
  path = os.path.join(directory, str(int(step)), "state")
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", None) or meta
  if not isinstance(tree, dict) or "params" not in tree:
    raise InputError(f"{path}: not a bepa-jax train state (no params in it)")
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"])
  item = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree["params"])}
  restored = ckptr.restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args={"params": as_numpy}, partial_restore=True))
  return int(step), restored["params"]
