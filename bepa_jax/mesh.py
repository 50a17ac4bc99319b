"""Device mesh and logical-axis shardings, all declared in config (`config.mesh`).

Parameters and activations name logical axes (model.py); `config.mesh.rules` maps them
to the mesh axes `data`, `fsdp`, `tensor`, so scaling out never needs a model edit.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bepa_jax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def resolve_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with -1 resolved; data includes dcn_data slices."""
  dcn = int(mesh_cfg.dcn_data)
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  names = ["mesh.data", "mesh.fsdp", "mesh.tensor"]
  if dcn < 1:
    raise ConfigError(f"mesh.dcn_data must be >= 1, got {dcn}")
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError(f"at most one of mesh.data/fsdp/tensor may be -1, got {tuple(sizes)}")
  for n, s in zip(names, sizes):
    if s == 0 or s < -1:
      raise ConfigError(f"{n} must be a positive size or -1, got {s}")
  known = dcn * math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(
          f"mesh {dict(zip(names, sizes))} x dcn_data={dcn} cannot fill {num_devices} devices: "
          f"{num_devices} is not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if dcn * math.prod(sizes) != num_devices:
    raise ConfigError(
        f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} x dcn_data={dcn} = "
        f"{dcn * math.prod(sizes)} does not match the {num_devices} devices available")
  return sizes[0] * dcn, sizes[1], sizes[2]


def create_mesh(mesh_cfg, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; with dcn_data > 1, `data` spans slices over DCN."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_shape(mesh_cfg, len(devices))
  dcn = int(mesh_cfg.dcn_data)
  if dcn > 1:  # multislice: only the data axis crosses the slow DCN links
    ici = (shape[0] // dcn, shape[1], shape[2])
    grid = _topology_aware(mesh_utils.create_hybrid_device_mesh, ici, (dcn, 1, 1), devices)
  elif devices[0].platform in ("tpu", "gpu"):  # ICI-topology-aware device order
    grid = _topology_aware(mesh_utils.create_device_mesh, shape, devices)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * 3)


def _topology_aware(create, *args):
  """`create`'s device grid; where no logical axis matches the physical ones (tensor=4 on a
  16x16 v5e-256), split a physical axis, as MaxText's allow_split_physical_axes does."""
  try:
    return create(*args)
  except (NotImplementedError, ValueError):
    return create(*args, allow_split_physical_axes=True)


def spec_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec (or mesh.rules) entry: None, an axis, or a tuple."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


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


def shard_over_batch(sharding: NamedSharding, shape) -> NamedSharding:
  """ZeRO-1 (mesh.shard_optimizer): `sharding` split further over the batch axes (data, fsdp)
  it does not use yet, along the first dimension they divide together with the axes already
  on it; unchanged (replicated over them) when no dimension does. For the optimizer state,
  whose update is element-wise: each batch shard updates its slice, then the new parameters
  are gathered back to their own sharding."""
  mesh = sharding.mesh
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  used = {a for e in spec for a in spec_axes(e)}
  extra = tuple(a for a in BATCH_AXES if a not in used and mesh.shape[a] > 1)
  if not extra:
    return sharding
  count = math.prod(mesh.shape[a] for a in extra)
  for i, (dim, e) in enumerate(zip(shape, spec)):
    if dim % (count * math.prod(mesh.shape[a] for a in spec_axes(e))) == 0:
      spec[i] = spec_axes(e) + extra
      return NamedSharding(mesh, P(*spec))
  return sharding
