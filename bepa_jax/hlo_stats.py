"""What an optimised HLO module (compiled.as_text()) holds: its collectives and its buffers.

XLA:TPU hides most collectives from a search for `all-gather(`: an all-gather it overlaps with
compute becomes an *async collective fusion* (a `fusion` kind=kCustom that starts it, copies of
it inside the fusions that run meanwhile, one that ends it), and small all-reduces are combined
into one tuple-shaped all-reduce. This module counts each collective once, in the computation
that issues it, times the trip count of the while loops (nn.scan over layers) around it.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
          "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r"\"known_trip_count\":\{\"n\":\"(\d+)\"")
_OP_NAME = re.compile(r"op_name=\"([^\"]*)\"")


def arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
  """[(dtype, dims)] of every array in an HLO shape (a tuple lists several)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return out


def nbytes(dtype: str, dims: tuple) -> int:
  return _BYTES[dtype] * math.prod(dims)


@dataclasses.dataclass
class Instr:
  name: str
  shape: str          # the result shape text (layouts included)
  opcode: str
  rest: str           # operands and attributes


@dataclasses.dataclass
class Module:
  computations: dict  # name -> [Instr]
  entry: str

  @classmethod
  def parse(cls, text: str) -> "Module":
    comps, entry, current = {}, None, None
    for line in text.splitlines():
      head = _COMP_HEAD.match(line)
      if head:
        current = head.group(2)
        comps[current] = []
        if head.group(1):
          entry = current
        continue
      if current is None:
        continue
      if line.startswith("}"):
        current = None
        continue
      m = _INSTR.match(line)
      if m:
        comps[current].append(Instr(*m.groups()))
    return cls(comps, entry)

  def trip_count(self, ins: Instr) -> int:
    """A while loop's trip count: XLA's known_trip_count, else the loop condition's
    `i < N` with a constant N (a scan's counter starts at 0); 1 when neither is there."""
    found = _TRIP.search(ins.rest)
    if found:
      return int(found.group(1))
    cond = re.search(r"condition=%([\w.\-]+)", ins.rest)
    body = self.computations.get(cond.group(1), []) if cond else []
    consts = {i.name: i.rest for i in body if i.opcode == "constant"}
    for i in body:
      if i.opcode == "compare" and "direction=LT" in i.rest:
        for name in re.findall(r"%([\w.\-]+)", i.rest.split(")")[0]):
          value = re.match(r"\s*(\d+)\)", consts.get(name, ""))
          if value:
            return int(value.group(1))
    return 1

  def multiplicities(self) -> dict:
    """computation -> times it runs per execution of the entry (while trip counts multiply;
    a loop of unknown trip count counts once; fusions and reductions inherit their caller's)."""
    mult = {}

    def visit(name, times):
      if name not in self.computations or mult.get(name, 0) >= times:
        return
      mult[name] = times
      for ins in self.computations[name]:
        trip = 1
        if ins.opcode == "while":
          trip = self.trip_count(ins)
        for kind, callee in _CALLS.findall(ins.rest):
          visit(callee, times * (trip if kind == "body" else 1))
        for group in _BRANCHES.findall(ins.rest):
          for callee in re.findall(r"%([\w.\-]+)", group):
            visit(callee, times)
    visit(self.entry, 1)
    return mult


def _is_collective(opcode: str) -> str | None:
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in COLLECTIVES else None


def group_size(rest: str, num_devices: int) -> int:
  """Devices per replica group: {{0,1,..}}, the iota form [G,S]<=[N], or mesh[...] {axes}."""
  m = re.search(r"replica_groups=\{\{([0-9,]*)\}", rest)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
  m = re.search(r"source_target_pairs=\{([^}]*)\}", rest)
  if m:
    return 2
  return num_devices


@dataclasses.dataclass
class Collective:
  kind: str                  # all-gather, all-reduce, reduce-scatter, ...
  arrays: list               # [(dtype, dims)] of its result (all-reduce: several if combined)
  group: int                 # devices per replica group
  times: int                 # per step (while trip counts)
  op_name: str               # the JAX op it came from (metadata), e.g. .../shard_map/all_gather
  fused: bool                # an async collective fusion (overlapped with compute)

  @property
  def result_bytes(self) -> int:
    return sum(nbytes(d, s) for d, s in self.arrays)

  @property
  def buffer_bytes(self) -> int:
    """The full buffer it moves: gathered result, scattered input, reduced array."""
    if self.kind == "reduce-scatter":
      return self.result_bytes * self.group
    return self.result_bytes

  @property
  def wire_bytes(self) -> float:
    """Bytes each chip sends per execution with ring algorithms."""
    n, s = self.group, self.buffer_bytes
    if n <= 1:
      return 0.0
    if self.kind == "all-reduce":
      return 2 * (n - 1) / n * s
    if self.kind == "collective-permute":
      return float(s)
    return (n - 1) / n * s

  def as_dict(self) -> dict:
    return dict(kind=self.kind, arrays=[f"{d}[{','.join(map(str, s))}]" for d, s in self.arrays],
                group=self.group, times=self.times, buffer_bytes=self.buffer_bytes,
                wire_bytes_per_chip=self.wire_bytes * self.times, op_name=self.op_name,
                async_fusion=self.fused)


def collectives(module: Module, num_devices: int) -> list[Collective]:
  """Every collective of the step, once each (see the module docstring)."""
  mult = module.multiplicities()
  fused_bodies = set()
  for comp in module.computations.values():
    for ins in comp:
      if ins.opcode == "fusion":
        fused_bodies.update(c for k, c in _CALLS.findall(ins.rest) if k == "calls")
  out, seen = [], set()
  for cname, comp in module.computations.items():
    if cname not in mult or cname in fused_bodies:
      continue
    for ins in comp:
      kind = _is_collective(ins.opcode)
      if kind:
        out.append(_collective(kind, ins, ins.shape, num_devices, mult[cname], False))
        continue
      if ins.opcode != "fusion":
        continue
      for callee in (c for k, c in _CALLS.findall(ins.rest) if k == "calls"):
        for inner in module.computations.get(callee, []):
          kind = _is_collective(inner.opcode)
          if not kind:
            continue
          # the start, its copies in the overlapped fusions and the done share these
          chain = re.search(r"chain_id=\"(\d+)\"", inner.rest)
          key = (cname, kind, tuple(arrays(inner.shape)), chain.group(1) if chain else inner.name,
                 _op_name(inner.rest))
          if key not in seen:
            seen.add(key)
            out.append(_collective(kind, inner, inner.shape, num_devices, mult[cname], True))
  return out


def _op_name(rest: str) -> str:
  m = _OP_NAME.search(rest)
  return m.group(1) if m else ""


def _collective(kind, ins, shape, num_devices, times, fused) -> Collective:
  arrs = arrays(shape)
  if ins.opcode.endswith("-start") and kind in ("all-gather", "collective-permute"):
    arrs = arrs[1:2]  # (operand, result, ...): the result
  return Collective(kind, arrs, group_size(ins.rest, num_devices), times, _op_name(ins.rest),
                    fused)


def buffers_with_dims(module: Module, dims: tuple) -> list[str]:
  """Instructions whose result holds an array of exactly `dims` (e.g. (B, B)): name and shape."""
  out = []
  for comp in module.computations.values():
    for ins in comp:
      if any(s == tuple(dims) for _, s in arrays(ins.shape)):
        out.append(f"%{ins.name} = {ins.shape.split('{')[0]} {ins.opcode}")
  return out


def largest_arrays(module: Module, top: int = 5) -> list[tuple[int, str]]:
  """The largest single arrays any instruction produces: (bytes, 'dtype[dims] opcode')."""
  best = {}
  for comp in module.computations.values():
    for ins in comp:
      for d, s in arrays(ins.shape):
        b = nbytes(d, s)
        key = f"{d}[{','.join(map(str, s))}]"
        if b > best.get(key, (0, ""))[0]:
          best[key] = (b, f"{key} {ins.opcode}")
  return sorted(best.values(), reverse=True)[:top]


_SIZE = re.compile(r"([0-9.]+)([KMGT]?)(i?B)?")


def _size(text: str) -> float:
  m = _SIZE.fullmatch(text)
  if not m:
    return float("nan")
  scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[m.group(2)]
  return float(m.group(1)) * scale


def oom_bytes(message: str) -> tuple[float, float] | None:
  """(bytes needed, bytes available) from XLA:TPU's out-of-HBM compile error ('... required
  for HLO temporaries (19.32G) exceeds available HBM (15.75G)', or 'Used 20.5G of 15.75G
  hbm'), or None for any other error."""
  if "RESOURCE_EXHAUSTED" not in message and "memory" not in message:
    return None
  m = (re.search(r"\(([0-9.]+[KMGT]?)\) exceeds available HBM \(([0-9.]+[KMGT]?)\)", message)
       or re.search(r"Used ([0-9.]+[KMGT]?) of ([0-9.]+[KMGT]?) hbm", message))
  if not m:
    return None
  needed, available = _size(m.group(1)), _size(m.group(2))
  if np.isnan(needed) or np.isnan(available):
    return None
  return needed, available


def _operands(ins: Instr) -> list[str]:
  return re.findall(r"%([\w.\-]+)", ins.rest.split(")")[0])


def _matmul_flops(ins: Instr, shapes: dict) -> float:
  """2 x MACs of a dot or convolution (XLA:TPU writes many dot_generals as convolutions)."""
  out = arrays(ins.shape)
  ops = [shapes.get(n) for n in _operands(ins)[:2]]
  if not out or len(ops) < 2 or not ops[0] or not ops[1]:
    return 0.0
  out_elems, (_, lhs), (_, rhs) = math.prod(out[0][1]), ops[0][0], ops[1][0]
  if ins.opcode == "dot":
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.rest)
    dims = [int(d) for d in m.group(1).split(",") if d] if m else []
    return 2.0 * out_elems * math.prod(lhs[d] for d in dims)
  labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", ins.rest)
  if not labels or len(labels.group(1)) != len(lhs) or len(labels.group(3)) != len(out[0][1]):
    return 0.0
  lhs_l, rhs_l, out_l = labels.groups()
  out_dims = out[0][1]
  spatial = sorted(c for c in out_l if c.isdigit())
  non_spatial = math.prod(out_dims[i] for i, c in enumerate(out_l) if not c.isdigit())
  groups = re.search(r"feature_group_count=(\d+)", ins.rest)
  in_features = lhs[lhs_l.index("f")] / (int(groups.group(1)) if groups else 1)
  window = _window(ins.rest, len(spatial))
  pairs = 1.0
  for n, c in enumerate(spatial):  # (output, kernel) position pairs that read a real input
    size, stride, (lo, _), lhs_dil, rhs_dil = (w[n] for w in window)
    o = np.arange(out_dims[out_l.index(c)])[:, None]
    k = np.arange(rhs[rhs_l.index(c)])[None, :]
    idx = o * stride + k * rhs_dil - lo
    pairs *= float(np.sum((idx % lhs_dil == 0) & (idx >= 0) & (idx < lhs[lhs_l.index(c)] * lhs_dil)
                          & (idx // lhs_dil < lhs[lhs_l.index(c)])))
  return 2.0 * non_spatial * in_features * pairs


def _window(rest: str, n: int):
  """Per spatial dim: (size, stride, (pad lo, hi), lhs_dilate, rhs_dilate) of a convolution."""
  m = re.search(r"window=\{([^}]*)\}", rest)
  attrs = dict(kv.split("=") for kv in m.group(1).split()) if m else {}
  def ints(key, default):
    return [int(x) for x in attrs[key].split("x")] if key in attrs else [default] * n
  pads = ([tuple(int(v) for v in p.split("_")) for p in attrs["pad"].split("x")]
          if "pad" in attrs else [(0, 0)] * n)
  return (ints("size", 1), ints("stride", 1), pads, ints("lhs_dilate", 1), ints("rhs_dilate", 1))


def matmul_flops(module: Module) -> tuple[float, float]:
  """(matmul FLOPs with every computation counted once, with while trip counts applied).

  XLA's cost_analysis() counts a while body once (its HloCostAnalysis cannot know the trip
  count): with nn.scan over 12 layers it reports the encoder's FLOPs / 12. The ratio of these
  two sums rescales it (bepa_jax/aot/report.py)."""
  mult = module.multiplicities()
  once = looped = 0.0
  for cname, comp in module.computations.items():
    if cname not in mult:
      continue
    shapes = {i.name: arrays(i.shape) for i in comp}
    for ins in comp:
      if ins.opcode in ("dot", "convolution"):
        f = _matmul_flops(ins, shapes)
        once += f
        looped += f * mult[cname]
  return once, looped


_NO_TRAFFIC = ("parameter", "tuple", "get-tuple-element", "bitcast", "constant", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id")


def memory_traffic(module: Module) -> tuple[float, float]:
  """(operand + result bytes of the top-level ops, every computation once / with trip counts):
  the same loop correction for XLA's `bytes accessed` as matmul_flops is for its flops."""
  mult = module.multiplicities()
  fused = {c for comp in module.computations.values() for i in comp if i.opcode == "fusion"
           for k, c in _CALLS.findall(i.rest) if k == "calls"}
  once = looped = 0.0
  for cname, comp in module.computations.items():
    if cname not in mult or cname in fused:
      continue
    shapes = {i.name: arrays(i.shape) for i in comp}
    for ins in comp:
      if ins.opcode in _NO_TRAFFIC:
        continue
      b = sum(nbytes(d, s) for d, s in arrays(ins.shape))
      b += sum(nbytes(d, s) for n in _operands(ins) for d, s in shapes.get(n, []))
      once += b
      looped += b * mult[cname]
  return once, looped
