"""Device mesh and logical-axis shardings, all declared in config (`config.mesh`).

Parameters and activations name logical axes (model.py); `config.mesh.rules` maps them
to the mesh axes `data`, `fsdp`, `tensor`, so scaling out never needs a model edit.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bepa_jax import config as config_lib

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def create_mesh(mesh_cfg, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; with dcn_data > 1, `data` spans slices over DCN."""
  devices = list(jax.devices() if devices is None else devices)
  shape = config_lib.resolve_mesh_shape(mesh_cfg, len(devices))
  dcn = int(mesh_cfg.dcn_data)
  if dcn > 1:  # multislice: only the data axis crosses the slow DCN links
    ici = (shape[0] // dcn, shape[1], shape[2])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices)
  elif devices[0].platform in ("tpu", "gpu"):  # ICI-topology-aware device order
    grid = mesh_utils.create_device_mesh(shape, devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def rules(mesh_cfg) -> tuple:
  return tuple((name, tuple(a) if isinstance(a, (list, tuple)) else a)
               for name, a in mesh_cfg.rules)


def logical_shardings(boxed_tree, mesh: Mesh, mesh_cfg):
  """NamedShardings for a tree of nn.Partitioned boxes (e.g. from jax.eval_shape(init))."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules(mesh_cfg))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
