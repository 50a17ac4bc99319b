"""Train-step throughput and MFU of bepa-jax against HF transformers in PyTorch, same run.

  python bench/step.py                       # tiny + small, ours vs PyTorch, 10 reps
  python bench/step.py --configs base --reps 3
  python bench/step.py --configs small --model.dtype=bfloat16 --baseline none

For each config: compile time, XLA's compiled peak memory, then `reps` rounds that alternate
one step of ours, one of each PyTorch variant and one large matmul per framework (the machine
is shared, so only ratios of interleaved medians are meaningful). Each PyTorch variant runs
in a worker process of its own, once per host-allocator setting (--torch_malloc): glibc's
defaults, as PyTorch users run it, and `retain`, the setting bepa-train applies on CPU
(bepa_jax/host_memory.py), so that the ratio with the allocator held equal is printed too.
MFU = analytic model FLOPs per step (bench/harness.train_flops) / step time / the XLA fp32
matmul FLOP/s measured here (and, stricter, / the best of the XLA and PyTorch matmul rates;
peak = fastest repetition). Honours XLA_FLAGS.
Results go to bench/results/step_<tag>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (sets up the repo path)
import torch_baseline  # noqa: E402  (torch itself is imported only in its worker processes)

from bepa_jax import host_memory  # noqa: E402


def _parse_value(v: str):
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(v.lower(), v)


def run_config(name: str, args, overrides: dict) -> dict:
  config = harness.make_config(name, **overrides)
  fl = harness.train_flops(config)
  compiled, state, batch, mesh, compile_s, mem = harness.build_jax_step(config)
  fns = {"ours": harness.step_runner(compiled, state, batch, mesh)}
  peak_fn, peak_flops = harness.jax_matmul(args.matmul_n)
  fns["xla_matmul"] = peak_fn
  workers = []
  if args.baseline != "none":
    variants = ["hf", "gathered"] if args.baseline == "both" else [args.baseline]
    for v in variants:
      for m in args.torch_malloc.split(","):
        w = torch_baseline.TorchWorker(name, overrides, v, m, args.matmul_n)
        workers.append(w)
        fns[w.name] = w
    fns["torch_matmul"] = workers[-1].matmul_fn()
  try:
    times = harness.interleaved(fns, args.reps, warmup=args.warmup)
  finally:
    for w in workers:
      w.close()
  med = {k: harness.median(v) for k, v in times.items()}
  # Peak = the best matmul rate observed (fastest repetition), not the median: a stall in one
  # repetition must not inflate MFU. The MFU denominator is the best of both frameworks.
  peak = peak_flops / min(times["xla_matmul"])
  best = max(peak, peak_flops / min(times["torch_matmul"])) if "torch_matmul" in times else peak
  res = dict(config=name, shapes=harness.SHAPES[name], overrides=overrides,
             flops_per_step=fl["step"], flops_breakdown=fl, compile_s=compile_s, memory=mem,
             peak_matmul_flops_xla=peak, peak_matmul_flops_best=best, times_s=times,
             median_s=med)
  for k in fns:
    if k.endswith("matmul"):
      continue
    res[k] = dict(step_s=med[k], tokens_per_s=fl["tokens"] / med[k],
                  sequences_per_s=fl["sequences"] / med[k],
                  mfu=fl["step"] / med[k] / peak, mfu_vs_best_matmul=fl["step"] / med[k] / best)
  if "torch_matmul" in times:
    res["peak_matmul_flops_torch"] = peak_flops / min(times["torch_matmul"])
  for k in fns:
    if k.startswith("torch_") and not k.endswith("matmul"):
      res[f"ratio_vs_{k}"] = med[k] / med["ours"]
  return res


def report(res: dict) -> None:
  print(f"\n== {res['config']} {res['overrides'] or ''}: {res['flops_per_step'] / 1e9:.1f} GFLOP/step,"
        f" compile {res['compile_s']:.1f}s, peak memory {res['memory']['peak_bytes'] / 2**20:.0f} MiB"
        f" (temps {res['memory']['temp_size'] / 2**20:.0f} MiB)")
  print(f"   XLA fp32 matmul peak {res['peak_matmul_flops_xla'] / 1e9:.0f} GFLOP/s"
        + (f", torch {res['peak_matmul_flops_torch'] / 1e9:.0f} GFLOP/s"
           if "peak_matmul_flops_torch" in res else ""))
  for k in [k for k in res if k == "ours" or (k.startswith("torch_") and isinstance(res[k], dict))]:
    r = res[k]
    ratio = f"   ours/this = {res['ratio_vs_' + k]:.2f}x" if k != "ours" else ""
    print(f"   {k:22s} {r['step_s'] * 1e3:8.1f} ms/step {r['tokens_per_s']:9.0f} tok/s "
          f"{r['sequences_per_s']:7.1f} seq/s  MFU {100 * r['mfu']:5.1f}% "
          f"({100 * r['mfu_vs_best_matmul']:4.1f}% of the best matmul){ratio}")


def plot(out: dict, path: str) -> str | None:
  """Tokens/s of ours and of each baseline, one panel per config, beside the JSON."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  results = out["results"]
  fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.2), squeeze=False)
  for ax, res in zip(axes[0], results):
    names = [k for k in res if k == "ours" or (k.startswith("torch_") and isinstance(res[k], dict))]
    tok = [res[k]["tokens_per_s"] for k in names]
    colors = ["tab:blue" if k == "ours" else "tab:gray" for k in names]
    ax.barh(names[::-1], tok[::-1], color=colors[::-1])
    for y, (k, t) in enumerate(zip(names[::-1], tok[::-1])):
      label = f"{t:,.0f}" + ("" if k == "ours" else f"  (ours {res['ratio_vs_' + k]:.2f}x)")
      ax.text(t, y, " " + label, va="center", fontsize=8)
    ax.set_xlim(0, max(tok) * 1.6)
    ax.set_xlabel("tokens / s (fp32, CPU)")
    ax.set_title(f"{res['config']}: MFU {100 * res['ours']['mfu_vs_best_matmul']:.1f}%", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench/step.py", description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="tiny,small", help="comma list of tiny, small, base")
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--baseline", choices=("hf", "gathered", "both", "none"), default="both")
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--tag", default="", help="suffix of the JSON file name")
  p.add_argument("--results_dir", default=harness.RESULTS, help="where the JSON and PNG go")
  p.add_argument("--host_malloc", choices=host_memory.MODES, default="auto",
                 help="ours: glibc settings of this process (bepa_jax/host_memory.py; auto = "
                      "what bepa-train does: retain on CPU)")
  p.add_argument("--torch_malloc", default="system,retain",
                 help="PyTorch workers to run, one per glibc setting: system (glibc's "
                      "defaults, as PyTorch users run it) and/or retain (the same as ours)")
  args, rest = p.parse_known_args(argv)
  for m in args.torch_malloc.split(","):
    if m not in torch_baseline.MALLOC_SETTINGS:
      p.error(f"--torch_malloc: {m!r} is not one of {', '.join(torch_baseline.MALLOC_SETTINGS)}")
  # Before anything starts XLA's threads: they keep the malloc arena they first use.
  host_memory.configure(args.host_malloc)
  overrides = {}
  for a in rest:
    if not a.startswith("--model.") or "=" not in a:
      p.error(f"unknown argument {a!r} (model overrides look like --model.dtype=bfloat16)")
    k, v = a[len("--model."):].split("=", 1)
    overrides[k] = _parse_value(v)
  names = [c.strip() for c in args.configs.split(",") if c.strip()]
  for n in names:
    if n not in harness.SHAPES:
      p.error(f"unknown config {n!r} (choose from {', '.join(harness.SHAPES)})")
  out = dict(machine=harness.machine_info(), reps=args.reps, host_malloc=args.host_malloc,
             host_malloc_applied=host_memory.applied(), torch_malloc=args.torch_malloc,
             results=[])
  print(f"machine: {out['machine']}")
  print(f"host malloc: ours {args.host_malloc} (retuned: {host_memory.applied()}), "
        f"PyTorch workers: {args.torch_malloc}")
  for n in names:
    res = run_config(n, args, overrides)
    report(res)
    out["results"].append(res)
  out["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
  tag = args.tag or "_".join(names)
  print("saved", harness.save_json(f"step_{tag}.json", out, args.results_dir))
  png = plot(out, os.path.join(args.results_dir, f"step_{tag}.png"))
  if png:
    print("saved", png)


if __name__ == "__main__":
  main()
