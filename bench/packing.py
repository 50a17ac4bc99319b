"""Sequence packing: real tokens/s of ours packed vs ours padded vs the authors' PyTorch step
(dynamic padding) vs HF padded to max_length, on real Multi30k sentences, same run.

  python bench/packing.py                                   # small + base, L 128, 300-step curve
  python bench/packing.py --configs small --reps 3 --steps 30   # a quick run

Every column runs the authors' objective (clean [CLS] passes of x and y, TLM pair MLM, their
candidate set: bench/authors_step.py) on the same sentence pairs (Multi30k en-de train), the
same token ids and masking and the same initial weights:
  ours_packed    bepa-jax with data.packing=True: several sentences per row, static shapes;
  ours_padded    bepa-jax with every sentence padded to data.max_length;
  authors_torch  the PyTorch peer of the authors' step (HF BertForMaskedLM with `labels`, as
                 their code calls it), each pass padded to the batch's longest (their collator);
  hf_max_length  the same PyTorch step with every pass padded to data.max_length.
The PyTorch steps run in worker processes of their own (bench/authors_peer.PeerWorker; glibc
defaults and torch's thread count, as their users run it, unless --torch_malloc/--torch_threads
say otherwise); repetitions interleave one step of each column on the same batch. Real tokens
= the x and y sentence tokens incl. [CLS]/[SEP] (the same count for every column); padding
fraction = 1 - non-pad / processed tokens over the step's three encoder passes
(bepa_jax/training/throughput.py for ours). Targets (issue 16): packed >= 3x padded and >= 2x the
authors' PyTorch step, in real tokens/s.

Then the loss of ours packed and padded over --steps steps on the same batches (from the same
initial weights; dropout --curve_dropout, 0 by default so that the two must coincide: packing is
exact). Results: bench/results/packing_<tag>.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
for _p in (REPO, BENCH):
  if _p not in sys.path:
    sys.path.insert(0, _p)
import authors_peer  # noqa: E402  (neither imports jax nor torch at module level)
import authors_step  # noqa: E402

# harness.SHAPES' model shapes; "micro" is for the smoke test only
MICRO = dict(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, pairs=8)
TARGETS = {"ours_padded": 3.0, "authors_torch": 2.0}  # packed real tokens/s >= this x column's


def make_config(name: str, max_length: int, vocab: int, dropout: float, source: str,
                tokenizer: str, packed: bool):
  """The authors' step (authors_step.make_config) at `name`'s model shape and `max_length`."""
  import harness
  c = authors_step.make_config("small", "pair", "bert", dropout, source, tokenizer)
  shape = MICRO if name == "micro" else harness.SHAPES[name]
  for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size"):
    c.model[k] = shape[k]
  c.model.max_position_embeddings = max(512, max_length)
  c.data.max_length = max_length
  c.data.max_predictions_per_seq = harness.n_predictions(max_length)
  c.tokenizer.vocab_size = vocab
  c.train.global_batch = shape["pairs"]
  c.data.packing = packed
  return c


def _signature(batch: dict) -> tuple:
  return tuple(sorted((k, v.shape) for k, v in batch.items()))


def ours_runner(job, host_batches: list):
  """One step of `job` per call on the next batch (cycling); a packed step whose rows fall back
  to another shape has its own executable, compiled before the timing (`compile_all`)."""
  import jax
  from bepa_jax.trainer import loop
  device = [loop.global_batch(b, job.mesh) for b in host_batches]
  holder = {"state": job.state, "i": 0, "compiled": {}}

  def compile_all():
    t0 = time.perf_counter()
    with jax.set_mesh(job.mesh):
      for b, d in zip(host_batches, device):
        sig = _signature(b)
        if sig not in holder["compiled"]:
          holder["compiled"][sig] = job.step_fn.lower(holder["state"], d).compile()
    return time.perf_counter() - t0

  def run():
    i = holder["i"] % len(device)
    holder["i"] += 1
    with jax.set_mesh(job.mesh):
      holder["state"], metrics = holder["compiled"][_signature(host_batches[i])](
          holder["state"], device[i])
    jax.block_until_ready(metrics)
    run.losses.append(float(metrics["loss"]))
  run.losses, run.compile_all = [], compile_all
  run.executables = lambda: len(holder["compiled"])
  return run


def peer_processed(peer: dict) -> int:
  return int(peer["x_ids"].size + peer["y_ids"].size + peer["mlm_ids"].size)


def run_config(name: str, args, source: str, tok: str, tmp: str) -> dict:
  import harness
  from bepa_jax.training import throughput
  from bepa_jax.trainer import build as build_lib
  n = args.warmup + args.reps
  cfg = lambda packed: make_config(name, args.max_length, args.vocab, args.dropout, source, tok,
                                   packed)
  jobs = {k: build_lib.build(cfg(k == "ours_packed"), os.path.join(tmp, f"{name}_{k}"), _devices())
          for k in ("ours_packed", "ours_padded")}
  padded = jobs["ours_padded"]
  host = {k: [j.pipeline.batch(s) for s in range(n)] for k, j in jobs.items()}
  loss_cfg = padded.config.loss
  counts = {k: [throughput.count(b, loss_cfg) for b in bs] for k, bs in host.items()}
  peers = {"authors_torch": [authors_peer.peer_batch(b, "pair") for b in host["ours_padded"]],
           "hf_max_length": [authors_peer.peer_batch(b, "pair", args.max_length)
                             for b in host["ours_padded"]]}
  real = [c.real for c in counts["ours_padded"]]
  nonpad = [c.nonpad for c in counts["ours_padded"]]
  for k, cs in counts.items():  # the contract: every layout holds the same tokens
    if [c.real for c in cs] != real or [c.nonpad for c in cs] != nonpad:
      raise RuntimeError(f"{k}: its batches hold other tokens than the padded ones")
  processed = {k: [c.processed for c in cs] for k, cs in counts.items()}
  processed.update({k: [peer_processed(p) for p in ps] for k, ps in peers.items()})
  spec, weights = authors_peer.peer_spec(padded), authors_peer.initial_weights(padded)
  with open(os.path.join(tmp, f"{name}_spec.json"), "w") as f:
    json.dump(spec, f)
  fns, compile_s, workers = {}, {}, []
  for k, job in jobs.items():
    fns[k] = ours_runner(job, host[k])
    compile_s[k] = fns[k].compile_all()
  try:
    for k, ps in peers.items():
      path = os.path.join(tmp, f"{name}_{k}.npz")
      authors_peer.save_inputs(path, ps, weights)
      w = authors_peer.PeerWorker(os.path.join(tmp, f"{name}_spec.json"), path, "hf",
                                  args.torch_malloc, args.torch_threads)
      workers.append(w)
      fns[k] = w
    times = harness.interleaved(fns, args.reps, args.warmup, label=name)
  finally:
    for w in workers:
      w.close()
  timed = slice(args.warmup, None)
  real_step = float(np.mean(real[timed]))
  med = {k: harness.median(v) for k, v in times.items()}
  res = dict(config=name, max_length=args.max_length, pairs=int(padded.config.train.global_batch),
             vocab_size=padded.model_cfg.vocab_size, dropout=args.dropout,
             shape=MICRO if name == "micro" else harness.SHAPES[name], compile_s=compile_s,
             packed_executables=fns["ours_packed"].executables(),
             real_tokens_per_step=real_step, times_s=times, median_s=med,
             losses={k: getattr(f, "losses", []) for k, f in fns.items()}, columns=list(fns))
  for k in fns:
    proc = float(np.sum(processed[k][timed]))
    res[k] = dict(step_s=med[k], best_step_s=min(times[k]), real_tokens_per_s=real_step / med[k],
                  best_real_tokens_per_s=real_step / min(times[k]),
                  processed_tokens_per_step=proc / args.reps,
                  padding_fraction=1.0 - float(np.sum(nonpad[timed])) / proc)
  res["targets"] = {k: dict(target=t, ratio=res["ours_packed"]["real_tokens_per_s"]
                            / res[k]["real_tokens_per_s"],
                            best_ratio=res["ours_packed"]["best_real_tokens_per_s"]
                            / res[k]["best_real_tokens_per_s"])
                    for k, t in TARGETS.items()}
  for v in res["targets"].values():
    v["met"] = v["ratio"] >= v["target"]
  return res


def _devices():
  import jax
  return jax.devices()[:1]


def loss_curves(name: str, args, source: str, tok: str, tmp: str) -> dict:
  """Loss of ours padded (and packed) over args.steps steps on the same batches."""
  import jax
  from bepa_jax.trainer import build as build_lib
  from bepa_jax.trainer import loop
  layouts = [False, True]
  curves, t0 = {}, time.perf_counter()
  for packed in layouts:
    key = "packed" if packed else "padded"
    config = make_config(name, args.max_length, args.vocab, args.curve_dropout, source, tok,
                         packed)
    job = build_lib.build(config, os.path.join(tmp, f"curve_{name}_{key}"), _devices())
    state, rec = job.state, {"loss": [], "mlm_loss": [], "contrastive_loss": []}
    with jax.set_mesh(job.mesh):
      for s in range(args.steps):
        state, m = job.step_fn(state, loop.global_batch(job.pipeline.batch(s), job.mesh))
        m = jax.device_get(m)
        for k in rec:
          rec[k].append(float(m[k]))
        done = s + 1
        if done % max(args.steps // 10, 1) == 0 or done == args.steps:
          left = len(layouts) * args.steps - (len(curves) * args.steps + done)
          rate = (len(curves) * args.steps + done) / (time.perf_counter() - t0)
          print(f"  [curve {name}/{key}] step {done}/{args.steps} loss {rec['loss'][-1]:.4f} "
                f"| {rate:.2f} steps/s | ETA {left / rate:.0f}s", flush=True)
    curves[key] = rec
  out = dict(config=name, steps=args.steps, dropout=args.curve_dropout, curves=curves)
  diff = np.abs(np.array(curves["packed"]["loss"]) - np.array(curves["padded"]["loss"]))
  out.update(max_abs_loss_diff=float(diff.max()), mean_abs_loss_diff=float(diff.mean()))
  return out


def report(res: dict) -> list[str]:
  lines = [f"== {res['config']} (L = {res['max_length']}, {res['pairs']} pairs, vocab "
           f"{res['vocab_size']}): {res['real_tokens_per_step']:.0f} real tokens / step",
           "| column | ms / step (median) | fastest | real tokens/s | processed / step "
           "| padding |", "|---|---:|---:|---:|---:|---:|"]
  for k in res["columns"]:
    r = res[k]
    lines.append(f"| {k} | {r['step_s'] * 1e3:,.0f} | {r['best_step_s'] * 1e3:,.0f} | "
                 f"{r['real_tokens_per_s']:,.0f} | {r['processed_tokens_per_step']:,.0f} | "
                 f"{100 * r['padding_fraction']:.0f}% |")
  for k, v in res["targets"].items():
    lines.append(f"   packed / {k}: {v['ratio']:.2f}x real tokens/s (fastest reps "
                 f"{v['best_ratio']:.2f}x), target >= {v['target']:.0f}x: "
                 f"{'met' if v['met'] else 'NOT met'}")
  r = {k: res[k]["real_tokens_per_s"] for k in res["columns"]}
  lines.append(f"   padded / authors_torch: {r['ours_padded'] / r['authors_torch']:.2f}x, "
               f"authors_torch / hf_max_length: {r['authors_torch'] / r['hf_max_length']:.2f}x")
  return lines


def plot(out: dict, path: str) -> str | None:
  """Real tokens/s per column (one panel per config) and the loss curves."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  results, curves = out["results"], out["curves"]
  n = len(results) + len(curves)
  fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.4), squeeze=False)
  for ax, res in zip(axes[0], results):
    names = res["columns"][::-1]
    tok = [res[k]["real_tokens_per_s"] for k in names]
    ax.barh(names, tok, color=["tab:blue" if k.startswith("ours") else "tab:gray" for k in names])
    for y, k in enumerate(names):
      ax.text(res[k]["real_tokens_per_s"], y, f" {res[k]['real_tokens_per_s']:,.0f} "
              f"(pad {100 * res[k]['padding_fraction']:.0f}%)", va="center", fontsize=8)
    ax.set_xlim(0, max(tok) * 1.7)
    ax.set_xlabel("real tokens / s (fp32, CPU)")
    ax.set_title(f"{res['config']}: L={res['max_length']}, {res['pairs']} pairs, {out['data']}",
                 fontsize=10)
  for ax, c in zip(axes[0][len(results):], curves):
    for key, rec in c["curves"].items():
      ax.plot(np.arange(1, len(rec["loss"]) + 1), rec["loss"], label=key,
              linestyle="--" if key == "packed" else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    gap = f", max |diff| {c['max_abs_loss_diff']:.1e}" if "max_abs_loss_diff" in c else ""
    ax.set_title(f"{c['config']}: loss, same batches (dropout {c['dropout']}){gap}", fontsize=10)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench/packing.py", description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="small,base", help="comma list of tiny, small, base")
  p.add_argument("--max_length", type=int, default=128)
  p.add_argument("--vocab", type=int, default=8000, help="sentencepiece pieces (both sides)")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--steps", type=int, default=300, help="loss-curve steps (0: no curve)")
  p.add_argument("--curve_configs", default="small", help="configs with a loss curve")
  p.add_argument("--dropout", type=float, default=0.1, help="timed steps: hidden and attention")
  p.add_argument("--curve_dropout", type=float, default=0.0,
                 help="loss curves (0: packed and padded must coincide)")
  p.add_argument("--torch_malloc", choices=authors_peer.MALLOC_SETTINGS, default="system")
  p.add_argument("--torch_threads", type=int, default=0, help="0 = torch's default")
  p.add_argument("--data", default=authors_step.MULTI30K,
                 help="dir with Multi30k train.{en,de}.gz ('embedded': the bundled corpus, "
                      "for smoke tests only)")
  p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "bepa_authors_step"),
                 help="where the sentencepiece models are kept between runs")
  p.add_argument("--host_malloc", default="auto", help="ours: bepa_jax/host_memory.py mode")
  p.add_argument("--tag", default="")
  p.add_argument("--results_dir", default=os.path.join(BENCH, "results"))
  args = p.parse_args(argv)
  import harness  # noqa: F401  (after argparse: --help needs no jax)
  names = [c for c in args.configs.split(",") if c]
  curve_names = [c for c in args.curve_configs.split(",") if c] if args.steps > 0 else []
  for n in names + curve_names:
    if n not in harness.SHAPES and n != "micro":
      p.error(f"unknown config {n!r} (choose from {', '.join(harness.SHAPES)})")
  if args.reps < 1 or args.warmup < 0 or args.steps < 0:
    p.error("--reps must be >= 1, --warmup and --steps >= 0")
  if args.data != "embedded" and not os.path.exists(os.path.join(args.data, "train.en.gz")):
    print(f"bench/packing.py: skipped: no Multi30k at {args.data} (needs train.en.gz and "
          f"train.de.gz; pass --data DIR)", file=sys.stderr)
    return 0
  from bepa_jax import host_memory
  host_memory.configure(args.host_malloc)  # before XLA starts its threads
  import logging
  logging.getLogger("bepa").setLevel(logging.WARNING)
  source, data_name = authors_step.data_source(args.data)
  out = dict(machine=harness.machine_info(), reps=args.reps, warmup=args.warmup, data=data_name,
             torch_malloc=args.torch_malloc,
             torch_threads=args.torch_threads, results=[], curves=[])
  print(f"machine: {out['machine']}\ndata: {data_name} ({source})")
  lines = []
  with tempfile.TemporaryDirectory(prefix="packing_") as tmp:
    tok = authors_step.tokenizer_path(source, args.vocab, args.cache)
    for n in names:
      res = run_config(n, args, source, tok, tmp)
      out["results"].append(res)
      lines += report(res)
      print("\n".join(report(res)), flush=True)
    for n in curve_names:
      c = loss_curves(n, args, source, tok, tmp)
      out["curves"].append(c)
      lines.append(f"   loss curve {n}: packed vs padded over {c['steps']} steps, max |diff| "
                   f"{c['max_abs_loss_diff']:.2e} (mean {c['mean_abs_loss_diff']:.2e})")
      print(lines[-1], flush=True)
  out["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
  out["summary"] = "\n".join(lines)
  print("\n" + out["summary"])
  tag = args.tag or "_".join(names)
  print("saved", harness.save_json(f"packing_{tag}.json", out, args.results_dir))
  png = plot(out, os.path.join(args.results_dir, f"packing_{tag}.png"))
  if png:
    print("saved", png)
  print(f"next: python bench/packing.py --configs {','.join(names)} --reps 7 "
        "for tighter medians (figures: bench/README.md, Sequence packing)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
