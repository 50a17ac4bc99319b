"""`bepa-compile`: the real train step, compiled by XLA:TPU for a TPU slice, on this machine.

  bepa-compile --config configs/base.py --topology v5e-64 [--slices 2] [--out report.json] \
    [--config.train.global_batch=8192 ...]

No TPU is needed and nothing is allocated or downloaded: libtpu describes the slice (compile-only
devices), the state and batch are ShapeDtypeStructs carrying the run's shardings, and the step
is train.py's (model_parts) and step.py's (make_train_step). The compiled step reports memory
per chip (fits or not), FLOPs, collectives and a step-time estimate; see `report`.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from bepa_jax.cli import common as cli
from bepa_jax.config import validate as config_lib
from bepa_jax import hlo_stats
from bepa_jax import mesh as mesh_lib
from bepa_jax.training import step as step_lib
from bepa_jax import tpu_specs
from bepa_jax.config import load as config_load
from bepa_jax.trainer import build as build_lib
from bepa_jax.training import state as train_state
from bepa_jax.errors import BepaError, ConfigError
from bepa_jax.model import EncoderConfig

log = logging.getLogger("bepa")
PROG = "bepa-compile"


class LibtpuMissing(BepaError):
  """libtpu (XLA:TPU, which compiles for TPU topologies) is not importable."""


class DoesNotFit(BepaError):
  """The compiled step needs more HBM per chip than the chip has."""


# ----------------------------------------------------------------------------- libtpu
def libtpu_pin() -> str:
  """The libtpu requirement of the installed jax's `tpu` extra, e.g. libtpu==0.0.42.*."""
  try:
    for req in importlib.metadata.requires("jax") or []:
      if req.startswith("libtpu") and "extra == \"tpu\"" in req:
        return req.split(";")[0].strip()
  except importlib.metadata.PackageNotFoundError:
    pass
  return "libtpu"


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def require_libtpu() -> None:
  if not libtpu_available():
    raise LibtpuMissing(f"libtpu is not installed (XLA:TPU compiles for the topology): "
                        f"pip install '{libtpu_pin()}' (jax {jax.__version__}'s tpu extra), or "
                        f"pip install -e '.[test]'")


def topology_devices(topo: tpu_specs.Topology, slices: int) -> list:
  """The slice's compile-only devices (no TPU needed): libtpu's description of the topology."""
  from jax.experimental import topologies
  require_libtpu()
  # libtpu warns about a missing TPU environment unless told what it would run on
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.accelerator_type)
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # compile-only: no TPU is opened, so several processes (pytest -n 2, a sweep) may load libtpu
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topo.topology_name, chip_config_name=topo.chip.chip_config,
        chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=slices)
  except (jax.errors.JaxRuntimeError, RuntimeError) as e:
    raise BepaError(f"libtpu could not describe {topo.name} ({topo.topology_name}): "
                    f"{cli.one_line(e)}") from None
  return list(desc.devices)


# ----------------------------------------------------------------------------- abstract inputs
def vocab_size(config) -> tuple[int, str]:
  """(vocabulary size, where it came from): no tokenizer is read or trained here."""
  if int(config.model.vocab_size) > 0:
    return int(config.model.vocab_size), "model.vocab_size"
  if config.tokenizer.path or config.init.hf_dir:
    where = "tokenizer.path" if config.tokenizer.path else "init.hf_dir"
    raise ConfigError(f"model.vocab_size=0 takes the size from the tokenizer ({where}), which "
                      f"bepa-compile does not read: set --config.model.vocab_size=N")
  return int(config.tokenizer.vocab_size), "tokenizer.vocab_size (the tokenizer bepa-train " \
                                           "would train; at most this many pieces)"


def packed_rows(config) -> tuple[int, int] | None:
  """(rows per group for the sentence passes, for the TLM pair pass or 0) of a packed config
  whose rows are set, else None (data.packing=False, or rows chosen from the data: 0)."""
  d = config.data
  if not bool(d.get("packing", False)):
    return None
  pair = str(config.loss.mlm_input) == "pair"
  rows = (int(d.packed_rows), int(d.packed_pair_rows) if pair else 0)
  if not rows[0] or (pair and not rows[1]):
    return None
  return rows


def batch_shapes(config, batch_shards: int = 1) -> dict:
  """key -> (shape, dtype) of the global batch the pipeline (data/pair_pipeline.py) yields.

  Packed (data.packing with data.packed_rows set): the token arrays are [G, R, L], G = batch
  shards x micro-batches (one packing group each), with segment ids; the per-pair arrays
  (cls_index, MLM positions, labels) stay [B, ...].
  """
  B, L = int(config.train.global_batch), int(config.data.max_length)
  P = int(config.data.max_predictions_per_seq)
  i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
  pair = str(config.loss.mlm_input) == "pair"
  rows = packed_rows(config)
  if rows is not None:
    G = batch_shards * config_lib.packing_micro_batches(config.train)
    grid = lambda r: ((G, r, L), i32)
    out = {"input_ids": grid(rows[0]), "token_type_ids": grid(rows[0]),
           "attention_mask": grid(rows[0]), "segment_ids": grid(rows[0]),
           "cls_index": ((B, 2), i32), "text_hash": ((B, 2), i32)}
    if pair:
      out.update(mlm_input_ids=grid(rows[1]), mlm_segment_ids=grid(rows[1]),
                 mlm_attention_mask=grid(rows[1]))
    elif str(config.loss.cls_input) == "clean":
      out["mlm_input_ids"] = grid(rows[0])
  else:
    out = {"input_ids": ((B, 2, L), i32), "token_type_ids": ((B, 2, L), i32),
           "attention_mask": ((B, 2, L), i32), "text_hash": ((B, 2), i32)}
    if pair:  # one TLM sequence per pair
      out.update(mlm_input_ids=((B, L), i32), mlm_attention_mask=((B, L), i32))
    elif str(config.loss.cls_input) == "clean":
      out["mlm_input_ids"] = ((B, 2, L), i32)
  preds = (B, 2 * P) if pair else (B, 2, P)  # TLM: 2P predictions per pair sequence
  out.update(mlm_positions=(preds, i32), mlm_ids=(preds, i32), mlm_weights=(preds, f32))
  return out


def token_slots(config, batch_shards: int = 1) -> int:
  """Token positions the sentence passes of one step process (real + padding)."""
  shape = batch_shapes(config, batch_shards)["input_ids"][0]
  return math.prod(shape)


def abstract_batch(config, mesh, batch_shards: int) -> dict:
  sharding = mesh_lib.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in batch_shapes(config, batch_shards).items()}


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (its shards)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return int(total)


# ----------------------------------------------------------------------------- compile
def compile_step(config, topo: tpu_specs.Topology, slices: int = 1, hlo_path: str = "",
                 tokens_per_sentence: float = 0.0) -> dict:
  """Compiles the configured train step for `slices` x `topo`; returns the report dict.

  data.packing compiles the packed layout ([G, R, L] rows, block-diagonal attention) when its
  rows are given (data.packed_rows, and data.packed_pair_rows for TLM). With rows chosen from
  the data at start-up (0, the default) there is no data to choose them from: the padded
  layout is compiled, an upper bound (the packing fallback is that shape); the report says so.
  `tokens_per_sentence` (mean real tokens with [CLS]/[SEP], from the data) turns pairs/s into
  real tokens/s; without it only token positions/s (padding included) are reported.
  """
  layout = "padded"
  if bool(config.data.get("packing", False)):
    rows = packed_rows(config)
    if rows is None:
      config = config.copy_and_resolve_references()
      config.data.packing = False
      layout = ("padded: the upper bound of data.packing with rows chosen from the data "
                "(set --config.data.packed_rows=R, from bepa-train's `packing:` line, for the "
                "packed layout)")
    else:
      layout = f"packed ({rows[0]} rows per group" + (
          f", {rows[1]} TLM rows" if rows[1] else "") + ")"
    log.info("bepa-compile: layout %s", layout)
  devices = topology_devices(topo, slices)
  B, L = int(config.train.global_batch), int(config.data.max_length)
  if tokens_per_sentence > L:
    raise ConfigError(f"--tokens_per_sentence={tokens_per_sentence:g} is more than "
                      f"data.max_length={L}")
  if slices > 1 and int(config.mesh.dcn_data) != slices:
    raise ConfigError(f"--slices={slices} needs --config.mesh.dcn_data={slices} (the data axis "
                      f"spans the slices), got mesh.dcn_data={config.mesh.dcn_data}")
  shape = build_lib.check_config(config, len(devices))
  vocab, vocab_from = vocab_size(config)
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  model_cfg = EncoderConfig.from_config(config.model, vocab_size=vocab)
  parts = build_lib.model_parts(config, model_cfg, mesh)
  state, shardings = train_state.abstract_state(*parts.init_args, **parts.init_kwargs)
  step_fn = step_lib.make_train_step(parts.model, config, mesh, shardings, parts.schedule)
  shards = shape[0] * shape[1]  # data x fsdp: the batch shards, one packing group each
  batch = abstract_batch(config, mesh, shards)
  slots = token_slots(config, shards)
  if 2 * B * tokens_per_sentence > slots:
    raise ConfigError(f"--tokens_per_sentence={tokens_per_sentence:g}: {2 * B} sentences hold "
                      f"{2 * B * tokens_per_sentence:,.0f} real tokens, more than the {slots:,} "
                      f"positions of the packed rows (data.packed_rows={config.data.packed_rows})")
  log.info("compiling the train step for %s x %d (%d chips, mesh %s) with XLA:TPU ...",
           topo.name, slices, len(devices), dict(zip(mesh_lib.AXES, shape)))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = step_fn.lower(state, batch)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      oom = hlo_stats.oom_bytes(str(e))
      if oom is None:
        raise BepaError(f"XLA:TPU could not compile the step for {topo.name}: "
                        f"{cli.one_line(e)}") from None
      compiled = None
  compile_s = time.perf_counter() - t0
  sizes = dict(
      params=bytes_per_device(state.params), opt_state=bytes_per_device(state.opt_state),
      ema_params=bytes_per_device(state.ema_params) if state.ema_params is not None else 0,
      batch=bytes_per_device(batch))
  info = dict(topology=topo.name, slices=slices, chips=len(devices), chip=topo.chip.kind,
              topology_name=topo.topology_name, mesh=dict(zip(mesh_lib.AXES, shape)),
              vocab_size=vocab, vocab_from=vocab_from,
              params=train_state.count_params(state.params),
              global_batch=int(config.train.global_batch),
              max_length=int(config.data.max_length), compile_s=compile_s,
              dtype=str(config.model.dtype), remat=str(config.model.remat),
              contrastive_chunk=int(config.loss.contrastive_chunk), layout=layout,
              token_slots_per_step=slots,
              tokens_per_sentence=float(tokens_per_sentence),
              state_bytes_per_chip=sizes)
  if compiled is None:
    return report_oom(info, topo, oom)
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(compiled.as_text())
  return report(info, config, topo, compiled, model_cfg)


# ----------------------------------------------------------------------------- report
def carries_cls(c: hlo_stats.Collective, B: int, D: int) -> bool:
  """Whether the collective moves the [B, D] [CLS] embeddings (or their cotangent)."""
  if c.kind == "all-gather":
    return any(math.prod(s) == B * D for _, s in c.arrays) and "all_gather" in c.op_name
  if c.kind == "reduce-scatter":
    return any(math.prod(s) * c.group == B * D for _, s in c.arrays)
  return any(s == (B, D) for _, s in c.arrays)


def roles(colls: list, B: int, D: int, fsdp: int = 1) -> list[str]:
  """What each collective is for, from the JAX op it came from, its shapes and its order.

  XLA:TPU may turn the [CLS] all-gather into an all-reduce (each chip adds its rows into a
  zero [B, D]) and fold the backward reduce-scatter into the gradient all-reduce; both lose
  their op_name when combined. The first such collective in the schedule is the forward one.
  """
  out, seen_cls = [], False
  for c in colls:
    if carries_cls(c, B, D):
      fwd = "transpose(" not in c.op_name and (bool(c.op_name) or not seen_cls)
      seen_cls = True
      if fwd:
        out.append("[CLS] all-gather (fwd)" + (" as all-reduce" if c.kind == "all-reduce"
                                               else ""))
      elif c.kind == "all-gather":
        out.append("[CLS] all-gather (bwd, again)")
      else:
        extra = len([s for _, s in c.arrays if s not in ((B, D), ())])
        out.append("[CLS] reduce-scatter (bwd)" + (" as all-reduce" if c.kind == "all-reduce"
                                                   else "") + (" + grads" if extra else ""))
    elif c.kind == "all-gather":  # without fsdp: XLA split an all-reduce (multislice, combiner)
      out.append("parameter all-gather (fsdp)" if fsdp > 1 else "all-gather (split all-reduce)")
    elif c.kind == "reduce-scatter":
      out.append("gradient reduce-scatter (fsdp)" if fsdp > 1
                 else "reduce-scatter (split all-reduce)")
    elif c.kind == "all-reduce":
      grad = len(c.arrays) > 2 or "transpose(" in c.op_name
      out.append("gradient all-reduce" if grad else "metrics all-reduce")
    else:
      out.append(c.kind)
  return out


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  cost = cost or {}
  return {k: float(cost.get(k, float("nan"))) for k in ("flops", "bytes accessed",
                                                         "transcendentals", "optimal_seconds")}


def step_time(cost: dict, chip: tpu_specs.Chip, ici_bytes: float) -> dict:
  """XLA's optimal_seconds where sane, else a roofline; the ICI time of the collectives on top
  as a floor (both assume communication overlaps compute)."""
  compute_s = cost["flops"] / chip.peak_bf16_flops
  hbm_s = cost["bytes accessed"] / chip.hbm_bytes_per_s
  ici_s = ici_bytes / chip.ici_bytes_per_s
  opt = cost["optimal_seconds"]
  # never faster than the chip's peak: a negative or sub-peak figure is not a step time
  sane = math.isfinite(opt) and opt > 0 and opt >= 0.99 * compute_s
  if sane:
    method, base = "xla_optimal_seconds", opt
  else:
    method, base = "roofline", max(compute_s, hbm_s)
    why = "negative" if math.isfinite(opt) and opt <= 0 else (
        "missing" if not math.isfinite(opt) else "faster than the chip's peak")
    method += f" (XLA optimal_seconds={opt:.3g} s not used: {why})"
  step_s = max(base, ici_s)
  parts = {"compute": compute_s, "HBM": hbm_s, "ICI": ici_s}
  bound = max(parts, key=parts.get)
  return dict(method=method, compute_s=compute_s, hbm_s=hbm_s, ici_s=ici_s, step_s=step_s,
              bound=bound, optimal_seconds=opt, optimal_seconds_sane=sane)


def memory(compiled, sizes: dict, chip: tpu_specs.Chip) -> dict:
  ma = compiled.memory_analysis()
  get = lambda k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
  arg, out, alias, temp = get("argument"), get("output"), get("alias"), get("temp")
  code = get("generated_code")
  total = arg + out - alias + temp + code
  return dict(params_and_optimizer=sizes["params"] + sizes["opt_state"] + sizes["ema_params"],
              **sizes, arguments=arg, outputs=out, aliased=alias, temporaries=temp,
              generated_code=code, total=total, hbm=chip.hbm_bytes, fits=total <= chip.hbm_bytes)


def report(info: dict, config, topo: tpu_specs.Topology, compiled, model_cfg) -> dict:
  module = hlo_stats.Module.parse(compiled.as_text())
  B, D = info["global_batch"], model_cfg.hidden_size
  colls = hlo_stats.collectives(module, info["chips"])
  coll_rows = [dict(role=r, **c.as_dict())
               for r, c in zip(roles(colls, B, D, info["mesh"]["fsdp"]), colls)]
  ici_bytes = sum(r["wire_bytes_per_chip"] for r in coll_rows)
  cost = _cost(compiled)
  raw = dict(cost)
  # cost_analysis() counts a while body once: rescale by the loop-counted HLO sums
  once_f, loop_f = hlo_stats.matmul_flops(module)
  once_b, loop_b = hlo_stats.memory_traffic(module)
  flops_scale = loop_f / once_f if once_f else 1.0
  bytes_scale = loop_b / once_b if once_b else 1.0
  cost["flops"] *= flops_scale
  cost["bytes accessed"] *= bytes_scale
  timing = step_time(cost, topo.chip, ici_bytes)
  slots = info["token_slots_per_step"]
  real = 2 * B * info["tokens_per_sentence"]
  mfu = cost["flops"] / (topo.chip.peak_bf16_flops * timing["step_s"])
  return dict(
      info, memory=memory(compiled, info["state_bytes_per_chip"], topo.chip),
      cost=dict(flops_per_chip=cost["flops"], flops_total=cost["flops"] * info["chips"],
                bytes_accessed_per_chip=cost["bytes accessed"],
                xla_flops_per_chip=raw["flops"], xla_bytes_accessed_per_chip=raw["bytes accessed"],
                loop_scale_flops=flops_scale, loop_scale_bytes=bytes_scale,
                transcendentals_per_chip=cost["transcendentals"]),
      time=timing, token_slots_per_s=slots / timing["step_s"],
      real_tokens_per_s=real / timing["step_s"] if real else None,
      pairs_per_s=B / timing["step_s"], mfu=mfu, peak_bf16_flops=topo.chip.peak_bf16_flops,
      chip_source=topo.chip.source, collectives=coll_rows, ici_bytes_per_chip=ici_bytes,
      b_by_B_buffers=hlo_stats.buffers_with_dims(module, (B, B))[:5],
      largest_arrays=[dict(bytes=b, array=a) for b, a in hlo_stats.largest_arrays(module)])


def report_oom(info: dict, topo: tpu_specs.Topology, oom: tuple) -> dict:
  needed, available = oom
  return dict(info, memory=dict(total=needed, hbm=available, fits=False,
                                params_and_optimizer=sum(
                                    info["state_bytes_per_chip"][k]
                                    for k in ("params", "opt_state", "ema_params")),
                                temporaries=None, from_compiler_error=True),
              collectives=[], chip_source=topo.chip.source)


def advice(rep: dict, config) -> str:
  """What to change when the step does not fit, most effective first."""
  mem = rep["memory"]
  tips = []
  if mem["params_and_optimizer"] > 0.3 * mem["hbm"] and int(rep["mesh"]["fsdp"]) == 1:
    tips.append("shard params and optimizer state with --config.mesh.fsdp=N")
  remat = str(config.model.remat)
  if remat != "full":
    tips.append(f"--config.model.remat={'dots_saveable' if remat == 'none' else 'full'}")
  if int(config.loss.contrastive_chunk) == 0:
    tips.append("stream the b x B logits with --config.loss.contrastive_chunk=1024")
  tips.append("a smaller --config.train.global_batch or --config.train.gradcache_chunks=K "
              "(one chunk's activations, the same negative pool)")
  if int(rep["mesh"]["fsdp"]) > 1 and mem["params_and_optimizer"] > 0.3 * mem["hbm"]:
    tips.append("a larger mesh.fsdp")
  return "; ".join(tips)


def gib(x) -> str:
  return "?" if x is None else f"{x / 2 ** 30:.2f}"


def human_bytes(x) -> str:
  if x is None:
    return "?"
  for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if abs(x) >= scale:
      return f"{x / scale:.2f} {unit}"
  return f"{x:.0f} B"


def format_report(rep: dict) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in rep["mesh"].items())
  lines = [f"{rep['topology']} x {rep['slices']} slice(s): {rep['chips']} chips "
           f"({rep['topology_name']}), mesh {mesh}",
           f"model {rep['params'] / 1e6:.2f}M params, vocab {rep['vocab_size']} (from "
           f"{rep['vocab_from']}), B={rep['global_batch']} pairs x L={rep['max_length']}, "
           f"{rep['dtype']}, remat={rep['remat']}, contrastive_chunk={rep['contrastive_chunk']}",
           f"layout: {rep['layout']}, {rep['token_slots_per_step']:,} token positions per "
           f"sentence pass (padded: {2 * rep['global_batch'] * rep['max_length']:,})",
           f"compiled by XLA:TPU in {rep['compile_s']:.1f} s on this machine", "",
           "memory per chip"]
  m = rep["memory"]
  rows = [("params + optimizer state", m["params_and_optimizer"])]
  if not m.get("from_compiler_error"):
    rows += [("  params", m["params"]), ("  optimizer state", m["opt_state"])]
    if m["ema_params"]:
      rows.append(("  EMA target", m["ema_params"]))
    rows += [("batch", m["batch"]), ("temporaries (activations, logits)", m["temporaries"]),
             ("outputs not aliased to inputs", m["outputs"] - m["aliased"]),
             ("program", m["generated_code"])]
  lines += [f"  {name:36s} {human_bytes(v):>10s}" for name, v in rows]
  verdict = "fits" if m["fits"] else "DOES NOT FIT"
  lines.append(f"  {'total / HBM':36s} {human_bytes(m['total']):>10s} / "
               f"{human_bytes(m['hbm'])}  {verdict} ({m['total'] / m['hbm']:.0%})")
  if m.get("from_compiler_error"):
    lines.append("  (XLA:TPU stopped: it ran out of HBM while compiling)")
    return "\n".join(lines)
  t, c = rep["time"], rep["cost"]
  lines += ["", "per step, per chip",
            f"  XLA flops {c['flops_per_chip']:.3g} (x {rep['chips']} = "
            f"{c['flops_total']:.3g}), bytes accessed {c['bytes_accessed_per_chip']:.3g}",
            f"  (cost_analysis() gave {c['xla_flops_per_chip']:.3g} flops, "
            f"{c['xla_bytes_accessed_per_chip']:.3g} bytes: while bodies counted once; x "
            f"{c['loop_scale_flops']:.2f} / x {c['loop_scale_bytes']:.2f} for the trip counts)",
            f"  compute {t['compute_s'] * 1e3:.2f} ms at the bf16 peak "
            f"({rep['peak_bf16_flops'] / 1e12:.0f} TFLOP/s, {rep['chip_source']}), HBM "
            f"{t['hbm_s'] * 1e3:.2f} ms, collectives over ICI {t['ici_s'] * 1e3:.3f} ms",
            f"  step {t['step_s'] * 1e3:.2f} ms ({t['bound']}-bound) from {t['method']}",
            f"  => {rep['pairs_per_s']:,.0f} pairs/s, " + (
                f"{rep['real_tokens_per_s']:,.0f} real tokens/s "
                f"({rep['tokens_per_sentence']:.1f} per sentence), " if rep["real_tokens_per_s"]
                else "") +
            f"{rep['token_slots_per_s']:,.0f} token positions/s (padding included), "
            f"MFU {rep['mfu']:.1%} of the bf16 peak (XLA's flops, remat included)", "",
            "collectives per step              kind            arrays                     "
            "group  x     MiB  ring MiB/chip"]
  B = rep["global_batch"]
  for r in rep["collectives"]:
    arrs = ", ".join(r["arrays"][:2]) + (f" +{len(r['arrays']) - 2}" if len(r["arrays"]) > 2
                                         else "")
    lines.append(f"  {r['role'][:32]:32s} {r['kind']:15s} {arrs[:26]:26s} {r['group']:5d} "
                 f"{r['times']:2d} {r['buffer_bytes'] / 2 ** 20:7.2f} "
                 f"{r['wire_bytes_per_chip'] / 2 ** 20:8.2f}")
  lines.append(f"  buffers of B x B = {B} x {B} in the compiled step: "
               f"{len(rep['b_by_B_buffers'])}; largest arrays: " + ", ".join(
                   f"{a['array']} {human_bytes(a['bytes'])}" for a in rep["largest_arrays"][:3]))
  return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def parse_args(argv):
  p = argparse.ArgumentParser(
      prog=PROG, allow_abbrev=False,
      description="Compile the configured train step for a TPU slice with XLA:TPU (no TPU "
      "needed) and report memory per chip, FLOPs, collectives and a step-time estimate. "
      "Takes bepa-train's --config FILE and --config.KEY=VALUE overrides.")
  p.add_argument("--config", default=config_load.DEFAULT_CONFIG_FILE)
  p.add_argument("--topology", required=True,
                 help=f"TPU slice: {', '.join(tpu_specs.known_names())}")
  p.add_argument("--slices", type=int, default=1,
                 help="multislice: this many slices over DCN (needs mesh.dcn_data = slices)")
  p.add_argument("--out", default="", help="JSON report path (default: none)")
  p.add_argument("--hlo", default="", help="also write the optimised HLO text here")
  p.add_argument("--tokens_per_sentence", type=float, default=0.0,
                 help="mean real tokens per sentence with [CLS]/[SEP] (bepa-train's `packing:` "
                 "line reports it): gives real tokens/s; default: pairs/s and positions/s only")
  args, rest = p.parse_known_args(argv)
  for i, item in enumerate(rest):
    prev = rest[i - 1] if i else ""
    if not item.startswith("--config.") and not (prev.startswith("--config.") and "=" not in prev):
      raise ConfigError(f"unexpected argument {item!r} (overrides are --config.KEY=VALUE)")
  if args.slices < 1:
    raise ConfigError(f"--slices must be >= 1, got {args.slices}")
  if not (math.isfinite(args.tokens_per_sentence) and args.tokens_per_sentence >= 0):
    raise ConfigError(f"--tokens_per_sentence must be >= 0, got {args.tokens_per_sentence}")
  return args, rest


def run_cli(argv) -> int:
  args, overrides = parse_args(argv)
  topo = tpu_specs.parse(args.topology)
  require_libtpu()  # before the config is loaded: the missing install is the first thing to fix
  config = config_load.load_config(args.config, overrides)
  rep = compile_step(config, topo, args.slices, args.hlo, args.tokens_per_sentence)
  rep["config"] = args.config
  rep["overrides"] = list(overrides)
  if args.out:  # first: the report survives a closed stdout
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(rep, f, indent=2, default=str)
  print(format_report(rep))
  if args.out:
    print(f"\nwrote {args.out}")
  if not rep["memory"]["fits"]:
    m = rep["memory"]
    temps = "" if m["temporaries"] is None else f", temporaries {gib(m['temporaries'])}"
    print(f"{PROG}: error: does not fit: {gib(m['total'])} GiB per chip needed, "
          f"{topo.chip.kind} has {gib(m['hbm'])} GiB (params + optimizer "
          f"{gib(m['params_and_optimizer'])}{temps}): try {advice(rep, config)}",
          file=sys.stderr)
    return cli.EXIT_FAILED
  return cli.EXIT_OK


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "JAX_PLATFORMS" not in os.environ:  # the host only lowers: never probe for a local TPU
    jax.config.update("jax_platforms", "cpu")
  cli.setup_logging()
  return cli.guarded(PROG, lambda: run_cli(argv))


# ----------------------------------------------------------------------------- crash guard
IN_PROCESS = "BEPA_COMPILE_IN_PROCESS"  # set in the child: compile here
# what a C++ fatal-signal handler prints (absl / libtpu), kept from the user's terminal
_CRASH_DUMP = re.compile(r"^\*\*\* SIG|^PC: @|^\s+@\s+0x|symbolize|RAW: ")


def libtpu_version() -> str:
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return "?"


def crash_line(code: int, dump: list[str]) -> str:
  """One line for a compiler process killed by a signal, from its crash dump."""
  try:
    sig = signal.Signals(-code).name
  except ValueError:
    sig = f"signal {-code}"
  where = next((m.group(1) for line in dump
                if (m := re.search(r"PC: @\s+0x[0-9a-f]+\s+\S+\s+(\S+)", line))), "")
  what = " stack overflow" if any("STACK OVERFLOW" in line for line in dump) else ""
  return (f"XLA:TPU crashed compiling the step ({sig}{what}" + (f" in {where}" if where else "")
          + f", libtpu {libtpu_version()}): a compiler bug, not a config error; seen with "
          "threefry attention dropout fused into a scanned layer's matmul (packed rows, bf16, "
          "remat=dots_saveable): try --config.train.dropout_rng=rbg, or "
          "--config.model.scan_layers=False")


def run_isolated(cmd: list[str], out_path: str = "", env: dict | None = None) -> int:
  """Runs the compile in a child process and streams its output: XLA:TPU can die of a signal
  (a C++ crash, no Python exception to catch), which becomes one line and exit 1 here, and a
  JSON {"failed": ...} at `out_path`."""
  env = dict(os.environ if env is None else env, **{IN_PROCESS: "1"})
  proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, errors="replace")
  dump = []
  try:
    for line in proc.stderr:
      if _CRASH_DUMP.search(line):
        dump.append(line)
      else:
        sys.stderr.write(line)
        sys.stderr.flush()
    code = proc.wait()
  except KeyboardInterrupt:  # the child got the same SIGINT: it says so and exits
    proc.wait()
    return cli.EXIT_INTERRUPTED
  if code >= 0:
    sys.stderr.writelines(dump)
    return code
  message = crash_line(code, dump)
  print(f"{PROG}: error: {message}", file=sys.stderr)
  if out_path:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
      json.dump(dict(failed="crash", error=message, signal=-code), f, indent=2)
  return cli.EXIT_FAILED


def run() -> None:
  """Console entry: the compile runs in a child process (see run_isolated)."""
  if os.environ.get(IN_PROCESS):
    sys.exit(main())
  p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  p.add_argument("--out", default="")
  out = p.parse_known_args(sys.argv[1:])[0].out
  sys.exit(run_isolated([sys.executable, "-m", "bepa_jax.cli.compile", *sys.argv[1:]], out))


if __name__ == "__main__":
  run()
