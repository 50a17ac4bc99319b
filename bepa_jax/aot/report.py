"""What a compiled step says: memory per chip (fits or not), FLOPs rescaled for loops, the
collectives and what each is for, a step-time estimate, and the text bepa-compile prints."""
from __future__ import annotations

import math

from bepa_jax import hlo_stats
from bepa_jax import tpu_specs
from bepa_jax.aot import flops as flops_lib
from bepa_jax.errors import BepaError


class DoesNotFit(BepaError):
  """The compiled step needs more HBM per chip than the chip has."""


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
  peak = topo.chip.peak_bf16_flops
  model = flops_lib.step_model_flops(config, model_cfg, info["tokens_per_sentence"])
  return dict(
      info, memory=memory(compiled, info["state_bytes_per_chip"], topo.chip),
      cost=dict(flops_per_chip=cost["flops"], flops_total=cost["flops"] * info["chips"],
                bytes_accessed_per_chip=cost["bytes accessed"],
                xla_flops_per_chip=raw["flops"], xla_bytes_accessed_per_chip=raw["bytes accessed"],
                loop_scale_flops=flops_scale, loop_scale_bytes=bytes_scale,
                transcendentals_per_chip=cost["transcendentals"]),
      time=timing, token_slots_per_s=slots / timing["step_s"],
      real_tokens_per_s=real / timing["step_s"] if real else None,
      pairs_per_s=B / timing["step_s"], model_flops=model,
      mfu=model["total"] / (info["chips"] * peak * timing["step_s"]),
      hfu=cost["flops"] / (peak * timing["step_s"]), peak_bf16_flops=peak,
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
            f"{rep['token_slots_per_s']:,.0f} token positions/s (padding included)",
            f"  MFU {rep['mfu']:.1%} of the bf16 peak (model FLOPs of the real tokens, "
            f"{rep['model_flops']['total']:.3g} per step, as MaxText and levanter count it"
            + ("" if rep["real_tokens_per_s"] else
               "; every sentence full length without --tokens_per_sentence") + "), "
            f"HFU {rep['hfu']:.1%} (XLA's flops: remat recompute, padding, element-wise)", "",
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
