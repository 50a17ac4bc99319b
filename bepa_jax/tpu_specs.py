"""TPU slice names -> compile-only topologies, and the published per-chip figures of each kind.

Names follow Cloud TPU accelerator types: v5e-N and v6e-N count chips; v4-N and v5p-N count
TensorCores (2 per chip, one JAX device per chip with megacore), so v4-32 is 16 chips.
"""
from __future__ import annotations

import dataclasses
import math

from bepa_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published figures per chip (the `source` page's key-specifications table)."""
  kind: str
  hbm_bytes: int
  peak_bf16_flops: float         # dense bf16 matmul FLOP/s
  hbm_bytes_per_s: float
  ici_bytes_per_s: float         # per chip, the rate a ring collective moves data at
  device_kind: str               # what jax reports for the chip
  chip_config: str               # libtpu: megacore = one device per chip of 2 TensorCores
  cores_per_chip: int            # in the accelerator-type name
  source: str


GIB = 2 ** 30
CHIPS = {
    # ICI: the all-reduce bandwidth per Pod (1.1 PB/s) / 4096 chips, as bench/pod_estimate.py
    "v4": Chip("v4", 32 * GIB, 275e12, 1200e9, 1.1e15 / 4096, "TPU v4", "megacore", 2,
               "cloud.google.com/tpu/docs/v4"),
    # ICI: 1600 Gbps = the all-reduce bandwidth per Pod (51.2 TB/s) / 256 chips
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 1600e9 / 8, "TPU v5 lite", "default", 1,
                "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 4800e9 / 8, "TPU v5", "megacore", 2,
                "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, 3584e9 / 8, "TPU v6 lite", "default", 1,
                "cloud.google.com/tpu/docs/v6e"),
}

# chips -> libtpu topology grid; 2D torus (v5e, v6e) and 3D (v4, v5p), as in the docs' tables
GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
           256: "16x16"}
GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
           256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str                      # e.g. v5e-64
  chip: Chip
  chips: int                     # per slice
  topology_name: str             # libtpu's, e.g. v5e:8x8
  chips_per_host_bounds: tuple

  @property
  def accelerator_type(self) -> str:
    """TPU_ACCELERATOR_TYPE's spelling (v5e is v5litepod on Cloud TPU)."""
    kind = "v5litepod" if self.chip.kind == "v5e" else self.chip.kind
    return f"{kind}-{self.chips * self.chip.cores_per_chip}"


def known_names() -> list[str]:
  out = []
  for kind, chip in CHIPS.items():
    grid = GRID_3D if chip.cores_per_chip == 2 else GRID_2D
    out += [f"{kind}-{n * chip.cores_per_chip}" for n in grid]
  return out


def parse(name: str) -> Topology:
  """'v5e-64' -> its Topology; an unknown name is a one-line ConfigError listing the known."""
  kind, _, count = str(name).partition("-")
  chip = CHIPS.get(kind)
  if chip is None or not count.isdigit():
    raise ConfigError(f"--topology={name!r} is not a TPU slice name like v5e-64; kinds: "
                      f"{', '.join(CHIPS)}")
  grid = GRID_3D if chip.cores_per_chip == 2 else GRID_2D
  cores = int(count)
  chips = cores // chip.cores_per_chip
  if cores % chip.cores_per_chip or chips not in grid:
    sizes = ", ".join(f"{kind}-{n * chip.cores_per_chip}" for n in grid)
    unit = "TensorCores (2 per chip)" if chip.cores_per_chip == 2 else "chips"
    raise ConfigError(f"--topology={name}: {kind} slices count {unit}; known sizes: {sizes}")
  shape = grid[chips]
  dims = [int(d) for d in shape.split("x")]
  # hosts of 4 chips (2x2x1); single-host 8-chip v5e/v6e VMs hold 2x4; smaller: the whole slice
  if chips <= 4:
    bounds = tuple(dims + [1] * (3 - len(dims)))
  elif chips == 8 and chip.cores_per_chip == 1:
    bounds = (2, 4, 1)
  else:
    bounds = (2, 2, 1)
  assert math.prod(dims) == chips
  return Topology(name, chip, chips, f"{kind}:{shape}", bounds)
