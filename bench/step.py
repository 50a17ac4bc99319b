"""Train-step throughput and MFU of bepa-jax against HF transformers in PyTorch, same run.

  python bench/step.py                       # tiny + small, ours vs PyTorch, 10 reps
  python bench/step.py --configs base --reps 3
  python bench/step.py --configs small --model.dtype=bfloat16 --baseline none
  python bench/step.py --configs tiny --model.vocab_size=250002 --mlm_vocab_chunk 16384

For each config: compile time, XLA's compiled peak memory, then `reps` rounds that alternate
one step of ours, one of each PyTorch variant and one large matmul per framework (the machine
is shared, so only ratios of interleaved medians are meaningful). Each PyTorch variant runs
in a worker process of its own, once per host-allocator setting (--torch_malloc): glibc's
defaults, as PyTorch users run it, and `retain`, the setting bepa-train applies on CPU
(bepa_jax/host_memory.py), so that the ratio with the allocator held equal is printed too.
MFU = analytic model FLOPs per step (bench/harness.train_flops) / median step time / the XLA
fp32 matmul FLOP/s measured here (and, stricter, / the best of the XLA and PyTorch matmul
rates). The XLA peak is the best of matmuls of three sizes (--matmul_n, /2, /4), two of each
per repetition, interleaved with the steps; if a step's model FLOP rate at its fastest
repetition beats it, the peak is reported unreliable and that rate is used as a lower bound
of the peak (harness.mfu_peak), so no MFU above 100% is printed. Throughput: real (non-pad)
tokens/s (bepa_jax/training/throughput.py; the synthetic batch is full length, padding 0%; real
sentences: bench/authors_step.py, bench/packing.py). Honours XLA_FLAGS.
--mlm_vocab_chunk N adds a row, ours_mlm_chunk: our step with loss.mlm_vocab_chunk=N (the MLM
cross-entropy streamed over N vocabulary rows at a time, bepa_jax/objective/mlm.py), its compile
time and compiled memory beside the dense step's, timed in the same interleaved rounds.
--profile DIR traces a few more steps of ours with jax.profiler after the timed rounds (so the
timings are not perturbed) and adds their op time by kind (matmuls first) to the JSON.
Results go to bench/results/step_<tag>.json.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (sets up the repo path)
import jax.numpy as jnp  # noqa: E402
import torch_baseline  # noqa: E402  (torch itself is imported only in its worker processes)

from bepa_jax import host_memory  # noqa: E402
from bepa_jax.training import throughput  # noqa: E402


def _parse_value(v: str):
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return {"true": True, "false": False}.get(v.lower(), v)


def run_config(name: str, args, overrides: dict) -> dict:
  config = harness.make_config(name, args.pairs, **overrides)
  fl = harness.train_flops(config)
  # Real tokens of the batch every step runs (the synthetic batch is full length: no padding).
  tokens = throughput.count(harness.synthetic_batch(config), config.loss)
  compiled, state, batch, mesh, compile_s, mem = harness.build_jax_step(config)
  fns = {"ours": harness.step_runner(compiled, state, batch, mesh)}
  chunk_row = None
  if args.mlm_vocab_chunk:  # the same step with the MLM cross-entropy streamed over the vocab
    config_c = harness.make_config(name, args.pairs, **overrides)
    config_c.loss.mlm_vocab_chunk = args.mlm_vocab_chunk
    compiled_c, state_c, batch_c, mesh_c, compile_c, mem_c = harness.build_jax_step(config_c)
    fns["ours_mlm_chunk"] = harness.step_runner(compiled_c, state_c, batch_c, mesh_c)
    chunk_row = dict(chunk=args.mlm_vocab_chunk, compile_s=compile_c, memory=mem_c)
  n = args.matmul_n
  peak_fn = harness.MatmulPeak(sorted({max(n // 4, 64), max(n // 2, 64), n}),
                               dtype=jnp.dtype(str(config.model.dtype)))
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
  steps = [k for k in fns if not k.endswith("matmul")]
  profiles = {}
  if args.profile:  # after the timed rounds, so the trace holds warm steps only
    for k in [k for k in steps if k.startswith("ours")]:
      profiles[k] = profile(fns[k], os.path.join(args.profile, f"{name}_{k}"), args.profile_steps)
  med = {k: harness.median(v) for k, v in times.items()}
  # Peak = the best matmul rate observed over sizes and repetitions (a stall only slows one
  # down); if a step's model FLOP rate beats it, the measurement is unreliable and that rate
  # bounds the peak from below (harness.mfu_peak): an MFU above 100% cannot be printed.
  xla = peak_fn.best
  torch_peak = n_flops(n) / min(times["torch_matmul"]) if "torch_matmul" in times else None
  achieved = {k: fl["step"] / min(times[k]) for k in steps}
  peak = harness.mfu_peak(xla, achieved)
  best = harness.mfu_peak(max(xla, torch_peak or 0.0), achieved)
  res = dict(config=name, shapes=harness.SHAPES[name], overrides=overrides,
             flops_per_step=fl["step"], flops_breakdown=fl, compile_s=compile_s, memory=mem,
             pairs=int(config.train.global_batch), matmul_dtype=str(config.model.dtype),
             peak_matmul_flops_xla=xla, peak_matmul_samples_xla=peak_fn.samples,
             peak_matmul_flops_best=best["peak"], mfu_peak=peak, mfu_peak_best=best,
             achieved_flops_fastest=achieved, real_tokens_per_step=tokens.real,
             processed_tokens_per_step=tokens.processed,
             padding_fraction=tokens.padding_fraction, times_s=times, median_s=med)
  for k in steps:
    res[k] = dict(step_s=med[k], best_step_s=min(times[k]),
                  real_tokens_per_s=tokens.real / med[k],
                  processed_tokens_per_s=tokens.processed / med[k],
                  padding_fraction=tokens.padding_fraction,
                  sequences_per_s=fl["sequences"] / med[k],
                  mfu=fl["step"] / med[k] / peak["peak"],
                  mfu_vs_best_matmul=fl["step"] / med[k] / best["peak"])
  if torch_peak is not None:
    res["peak_matmul_flops_torch"] = torch_peak
  if profiles:
    res["profile"] = profiles
  if chunk_row is not None:
    res["mlm_chunk"] = dict(chunk_row, time_ratio_vs_dense=med["ours_mlm_chunk"] / med["ours"])
  for k in steps:
    if k.startswith("torch_"):
      res[f"ratio_vs_{k}"] = med[k] / med["ours"]
  return res


def profile(step, trace_dir: str, steps: int) -> dict:
  """`steps` steps under jax.profiler, summed by op kind (bench/profile_summary.py)."""
  import jax
  import profile_summary
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      step()
  out = profile_summary.summarize(trace_dir, steps, top=15, quiet=True)
  out["ops"] = dict(list(out["ops"].items())[:40])
  return out


def n_flops(n: int) -> int:
  return 2 * n ** 3


def report(res: dict) -> None:
  print(f"\n== {res['config']} {res['overrides'] or ''}: {res['flops_per_step'] / 1e9:.1f} GFLOP/step,"
        f" compile {res['compile_s']:.1f}s, peak memory {res['memory']['peak_bytes'] / 2**20:.0f} MiB"
        f" (temps {res['memory']['temp_size'] / 2**20:.0f} MiB)")
  print(f"   XLA {res['matmul_dtype']} matmul peak {res['peak_matmul_flops_xla'] / 1e9:.0f} GFLOP/s (best of "
        f"{len(res['peak_matmul_samples_xla'])} matmuls, interleaved)"
        + (f", torch {res['peak_matmul_flops_torch'] / 1e9:.0f} GFLOP/s"
           if "peak_matmul_flops_torch" in res else ""))
  for p in (res["mfu_peak"], res["mfu_peak_best"]):
    if not p["reliable"]:
      print(f"   {p['note']}")
      break
  print(f"   tokens per step: {res['real_tokens_per_step']:,} real of "
        f"{res['processed_tokens_per_step']:,} processed (padding "
        f"{100 * res['padding_fraction']:.0f}%: synthetic full-length sentences)")
  for k in [k for k in res if k == "ours" or (k.startswith("torch_") and isinstance(res[k], dict))]:
    r = res[k]
    ratio = f"   ours/this = {res['ratio_vs_' + k]:.2f}x" if k != "ours" else ""
    print(f"   {k:22s} {r['step_s'] * 1e3:8.1f} ms/step {r['real_tokens_per_s']:9.0f} real tok/s "
          f"{r['sequences_per_s']:7.1f} seq/s  MFU {100 * r['mfu']:5.1f}% "
          f"({100 * r['mfu_vs_best_matmul']:4.1f}% of the best matmul){ratio}")
  if "mlm_chunk" in res:
    c, r = res["mlm_chunk"], res["ours_mlm_chunk"]
    print(f"   ours_mlm_chunk (loss.mlm_vocab_chunk={c['chunk']}): {r['step_s'] * 1e3:.1f} ms/step "
          f"({c['time_ratio_vs_dense']:.2f}x the dense step's), compile {c['compile_s']:.1f}s, "
          f"peak memory {c['memory']['peak_bytes'] / 2**20:.0f} MiB (temps "
          f"{c['memory']['temp_size'] / 2**20:.0f} MiB)")
  for k, prof in res.get("profile", {}).items():
    print(f"   profile of {k}: {prof['ms_per_step']:.1f} ms of op time per step, "
          f"{100 * prof['matmul_fraction']:.0f}% matmul ({prof['file']})")
    for kind, ns in list(prof["kinds"].items())[:8]:
      print(f"     {100 * ns / prof['total_ns']:5.1f}%  {kind}")


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
    tok = [res[k]["real_tokens_per_s"] for k in names]
    colors = ["tab:blue" if k == "ours" else "tab:gray" for k in names]
    ax.barh(names[::-1], tok[::-1], color=colors[::-1])
    for y, (k, t) in enumerate(zip(names[::-1], tok[::-1])):
      label = f"{t:,.0f}" + ("" if k == "ours" else f"  (ours {res['ratio_vs_' + k]:.2f}x)")
      ax.text(t, y, " " + label, va="center", fontsize=8)
    ax.set_xlim(0, max(tok) * 1.6)
    ax.set_xlabel(f"real tokens / s ({res.get('matmul_dtype', 'float32')}, "
                  f"{out['machine'].get('device_kind', 'cpu')})")
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
  p.add_argument("--pairs", type=int, default=0,
                 help="> 0: pairs per step instead of the config's (16); on an accelerator, "
                      "enough to fill it")
  p.add_argument("--tag", default="", help="suffix of the JSON file name")
  p.add_argument("--mlm_vocab_chunk", type=int, default=0,
                 help="> 0: also time our step with loss.mlm_vocab_chunk=N (row ours_mlm_chunk)")
  p.add_argument("--results_dir", default=harness.RESULTS, help="where the JSON and PNG go")
  p.add_argument("--profile", default="",
                 help="a folder: after the timed rounds, trace --profile_steps steps of each of "
                      "our steps there and add their op-time summary (bench/profile_summary.py)")
  p.add_argument("--profile_steps", type=int, default=2)
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
