"""The authors' step in PyTorch (HF model, three passes, dynamic padding) against ours, same run.

  python bench/authors_step.py                              # tiny + small, TLM pair MLM, 5 reps
  python bench/authors_step.py --mlm pair,sentence --reps 7
  python bench/authors_step.py --configs small --family xlmr --peer hf

Why: every later speed figure of bepa-jax should be comparable with what a user of the authors'
code (MarcelMatsal/llm-jepa-translation) runs. Their step, written here from its description in
docs/objective.md, is three encoder passes of an HF MaskedLM model: clean `[CLS] x [SEP]`, clean
`[CLS] y [SEP]` (both padded to the batch's longest sentence, as their collator pads both sides
to one length), and one masked pass: the TLM pair sequence `[CLS] x [SEP] [CLS] y [SEP]` padded
to the batch's longest pair (`--mlm pair`, their "bilingual") or the x and y sentences masked
alone, one [2B, longest] batch (`--mlm sentence`, "monolingual"). Loss = MLM cross-entropy at
the masked positions + lambda * symmetric InfoNCE on the L2-normalised last-layer [CLS],
candidates concat[z_y, z_x] with the anchor's own similarity unmasked, tau 0.07; AdamW with
weight decay off biases and LayerNorm, grad-norm clip 1.0, dropout as `--dropout`.
Peer variants: `hf`, the usual call with `labels` (-100 off the masked positions: vocabulary
logits at every position), as their code does, MLM accuracy by argmax included; `gathered`, the
same passes with the MLM head at the masked positions only (what ours does), to tell the head
apart from the padding.

Ours is the bepa-jax jitted step (`build_lib.build`, loss.cls_input=clean, loss.mlm_input=pair or
sentence, same-language negatives, self term unmasked), whose batches are padded to
data.max_length. Both get the same sentence pairs (Multi30k en-de train), the same token ids and
the same masking: the peer's tensors are our pipeline's batch with the padding cut to the
longest of each pass. Both start from the same weights (ours, converted with
bepa_jax/hf/convert.py) and use a constant learning rate, so their losses can be compared too.

Each peer runs in a worker process of its own (as bench/torch_baseline.py), once per host
allocator setting (`--torch_malloc`) and torch thread count (`--torch_threads`; 0 = torch's
default, all cores: on a loaded 2-core VM its OpenMP barriers can stall, so 1 is worth a row).
The repetitions interleave: one step of ours, one of each peer, on the same batch. Reported:
median and fastest ms/step (the fastest is robust to a loaded machine); real tokens/s = (sum of
the x and y sentence lengths incl. their [CLS]/[SEP], the same count for both) / median step
time; tokens processed per step (padding included, over the three passes); padding overhead =
processed / non-padding tokens of the passes (1.00 = no padding) and padding fraction = 1 -
non-padding / processed (ours: bepa_jax/training/throughput.py, the count bepa-train logs).
Results: bench/results/authors_step_<tag>.json and .png.
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
for _p in (REPO, BENCH):  # bepa_jax, and harness (imported where needed: it imports jax)
  if _p not in sys.path:
    sys.path.insert(0, _p)
from authors_peer import (MALLOC_SETTINGS, VARIANTS, PeerWorker, initial_weights,  # noqa: E402
                          peer_batch, peer_spec, save_inputs, token_counts)

MULTI30K = os.path.join(os.path.dirname(REPO), "shared", "data", "multi30k")

# name -> model shape, data.max_length, pairs per step, tokenizer size (micro: for the tests)
CONFIGS = {
    "micro": dict(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                  max_length=20, pairs=8, vocab=400),
    "tiny": dict(num_layers=2, hidden_size=128, num_heads=4, intermediate_size=512,
                 max_length=48, pairs=32, vocab=8000),
    "small": dict(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024,
                  max_length=128, pairs=16, vocab=8000),
}
MLM_MODES = ("pair", "sentence")


# ---------------------------------------------------------------------------- ours (JAX)
def data_source(data: str) -> tuple[str, str]:
  """(data.source, a name): Multi30k en-de train in `data`, else the bundled corpus en-de."""
  if data != "embedded" and os.path.exists(os.path.join(data, "train.en.gz")):
    return f"aligned:{data}/train.{{en,de}}", "multi30k en-de"
  return "embedded", "bundled corpus en-de"


def tokenizer_path(source: str, vocab: int, cache_dir: str) -> str:
  """One sentencepiece model for both sides (and both frameworks), trained once per source."""
  from bepa_jax.config import defaults as default_config
  from bepa_jax.data import factory
  from bepa_jax.data import tokenizer as tokenizer_lib
  out = os.path.join(cache_dir, f"spm_{'m30k' if source != 'embedded' else 'embedded'}_{vocab}")
  path = os.path.join(out, "spm.model")
  if not os.path.exists(path):
    d = default_config.get_config().data
    d.source, d.languages = source, "en,de"
    tokenizer_lib.train_sentencepiece(factory.training_texts(d), out, vocab)
  return path


def make_config(name: str, mlm: str = "pair", family: str = "bert", dropout: float = 0.1,
                source: str = "embedded", tokenizer: str = ""):
  """Our config of the authors' step: clean [CLS] passes, `mlm` MLM, their candidate set."""
  from bepa_jax.config import defaults as default_config
  import harness
  s = CONFIGS[name]
  c = default_config.get_config()
  for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size"):
    c.model[k] = s[k]
  c.model.max_position_embeddings = 512
  c.model.hidden_dropout = c.model.attention_dropout = float(dropout)
  if family == "xlmr":  # our tokenizer's [PAD] is 0: XLM-R positions count from pad + 1
    c.model.update(family="xlmr", type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=0)
  c.loss.update(cls_input="clean", mlm_input=mlm, same_language_negatives=True,
                mask_self=False)
  c.data.source, c.data.languages = source, "en,de"
  c.data.max_length = s["max_length"]
  c.data.max_predictions_per_seq = harness.n_predictions(s["max_length"])
  c.data.packing = False  # the padded step (and its [B, 2, L] layout) is what this compares
  c.tokenizer.path, c.tokenizer.kind, c.tokenizer.vocab_size = tokenizer, "spm", s["vocab"]
  c.train.global_batch = s["pairs"]
  c.optim.schedule, c.optim.warmup_steps = "constant", 0  # the peer's lr is constant too
  c.mesh.data = 1
  return c


def build_ours(config, workdir: str, devices=None):
  """train.build on one device: the job (pipeline, state, jitted step)."""
  import jax
  from bepa_jax.trainer import build as build_lib
  return build_lib.build(config, workdir, list(devices or jax.devices()[:1]))


# ---------------------------------------------------------------------------- the benchmark
def ours_runner(job, device_batches: list, compiled):
  """One step of ours per call on the next batch (cycling); records its loss."""
  import jax
  holder = {"state": job.state, "i": 0}

  def run():
    b = device_batches[holder["i"] % len(device_batches)]
    holder["i"] += 1
    with jax.set_mesh(job.mesh):
      holder["state"], metrics = compiled(holder["state"], b)
    jax.block_until_ready(metrics)
    run.losses.append(float(metrics["loss"]))
  run.losses = []
  return run


def run_config(name: str, mlm: str, args, source: str, tok: str, tmp: str) -> dict:
  import jax
  import harness
  from bepa_jax.trainer import loop
  config = make_config(name, mlm, args.family, args.dropout, source, tok)
  job = build_ours(config, os.path.join(tmp, f"{name}_{mlm}"))
  n = args.warmup + args.reps
  host = [job.pipeline.batch(s) for s in range(n)]
  peers = [peer_batch(b, mlm) for b in host]
  counts = [token_counts(b, mlm, p) for b, p in zip(host, peers)]
  device = [loop.global_batch(b, job.mesh) for b in host]
  spec, weights = peer_spec(job), initial_weights(job)
  t0 = time.perf_counter()
  with jax.set_mesh(job.mesh):
    compiled = job.step_fn.lower(job.state, device[0]).compile()
  compile_s = time.perf_counter() - t0
  spec_path = os.path.join(tmp, f"{name}_{mlm}_spec.json")
  inputs_path = os.path.join(tmp, f"{name}_{mlm}_inputs.npz")
  with open(spec_path, "w") as f:
    json.dump(spec, f)
  save_inputs(inputs_path, peers, weights)
  fns = {"ours": ours_runner(job, device, compiled)}
  workers = []
  try:
    for v in args.peer.split(","):
      for m in args.torch_malloc.split(","):
        for t in _ints(args.torch_threads):
          w = PeerWorker(spec_path, inputs_path, v, m, t)
          workers.append(w)
          fns[w.name] = w
    times = harness.interleaved(fns, args.reps, args.warmup, label=f"{name}/{mlm}")
  finally:
    for w in workers:
      w.close()
  timed = counts[args.warmup:]
  real = float(np.mean([c["real"] for c in timed]))
  nonpad = float(np.sum([c["nonpad"] for c in timed]))
  med = {k: harness.median(v) for k, v in times.items()}
  res = dict(config=name, mlm=mlm, family=args.family, shape=CONFIGS[name],
             max_length=int(config.data.max_length), pairs=int(config.train.global_batch),
             vocab_size=job.model_cfg.vocab_size, dropout=args.dropout,
             max_predictions_per_seq=int(config.data.max_predictions_per_seq),
             compile_s=compile_s, memory=harness.memory(compiled), token_counts=counts,
             real_tokens_per_step=real, times_s=times, median_s=med,
             losses={"ours": fns["ours"].losses, **{w.name: w.losses for w in workers}})
  for k in fns:
    processed = float(np.sum([c["ours" if k == "ours" else "peer"] for c in timed]))
    res[k] = dict(step_s=med[k], best_step_s=min(times[k]), real_tokens_per_s=real / med[k],
                  processed_tokens_per_step=processed / len(timed),
                  padding_overhead=processed / nonpad,
                  padding_fraction=1.0 - nonpad / processed,
                  processed_per_real_token=processed / (real * len(timed)),
                  ratio_this_over_ours=med[k] / med["ours"])
  return res


def _ints(csv: str) -> list[int]:
  return [int(x) for x in csv.split(",") if x]


def summary(results: list) -> str:
  """The final table: one row per framework and config."""
  lines = ["| config | MLM | step | ms / step (median) | fastest rep | real tokens/s "
           "| tokens processed / step | padding fraction | this ÷ ours (time) |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for res in results:
    for k in [k for k in res if k == "ours" or k.startswith("authors_")]:
      if not isinstance(res[k], dict):
        continue
      r = res[k]
      lines.append(f"| {res['config']} | {res['mlm']} | {k} | {r['step_s'] * 1e3:,.0f} | "
                   f"{r['best_step_s'] * 1e3:,.0f} | {r['real_tokens_per_s']:,.0f} | {r['processed_tokens_per_step']:,.0f} | "
                   f"{100 * r['padding_fraction']:.0f}% | {r['ratio_this_over_ours']:.2f} |")
  return "\n".join(lines)


def plot(out: dict, path: str) -> str | None:
  """Real tokens/s of ours and of each peer, one panel per (config, MLM mode)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  results = out["results"]
  fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.2), squeeze=False)
  for ax, res in zip(axes[0], results):
    names = [k for k in res if (k == "ours" or k.startswith("authors_"))
             and isinstance(res[k], dict)]
    tok = [res[k]["real_tokens_per_s"] for k in names]
    colors = ["tab:blue" if k == "ours" else "tab:gray" for k in names]
    ax.barh(names[::-1], tok[::-1], color=colors[::-1])
    for y, k in enumerate(names[::-1]):
      r = res[k]
      ax.text(r["real_tokens_per_s"], y, f" {r['real_tokens_per_s']:,.0f}  "
              f"(pad x{r['padding_overhead']:.2f})", va="center", fontsize=8)
    ax.set_xlim(0, max(tok) * 1.7)
    ax.set_xlabel("real tokens / s (fp32, CPU)")
    ax.set_title(f"{res['config']}, MLM {res['mlm']}: L={res['max_length']}, "
                 f"{res['pairs']} pairs", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench/authors_step.py", description=__doc__.splitlines()[0])
  p.add_argument("--configs", default="tiny,small", help=f"comma list of {', '.join(CONFIGS)}")
  p.add_argument("--mlm", default="pair", help="comma list of pair (TLM, their 'bilingual') "
                                               "and sentence ('monolingual')")
  p.add_argument("--family", choices=("bert", "xlmr"), default="bert")
  p.add_argument("--peer", default="hf,gathered", help="peer variants: hf and/or gathered")
  p.add_argument("--torch_malloc", default="system,retain",
                 help="one worker per glibc setting: system (as PyTorch users run it), retain")
  p.add_argument("--torch_threads", default="0",
                 help="one worker per torch intra-op thread count (comma list); 0 = torch's "
                      "default (all cores), as users run it")
  p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention, both sides")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--data", default=MULTI30K,
                 help="dir with Multi30k train.{en,de}.gz; 'embedded' = the bundled corpus")
  p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "bepa_authors_step"),
                 help="where the sentencepiece models are kept between runs")
  p.add_argument("--host_malloc", default="auto", help="ours: bepa_jax/host_memory.py mode")
  p.add_argument("--tag", default="", help="suffix of the result files")
  p.add_argument("--results_dir", default=os.path.join(BENCH, "results"))
  args = p.parse_args(argv)
  names = [c for c in args.configs.split(",") if c]
  modes = [m for m in args.mlm.split(",") if m]
  for n in names:
    if n not in CONFIGS:
      p.error(f"unknown config {n!r} (choose from {', '.join(CONFIGS)})")
  for m in modes:
    if m not in MLM_MODES:
      p.error(f"--mlm: {m!r} is not one of {', '.join(MLM_MODES)}")
  for v in args.peer.split(","):
    if v not in VARIANTS:
      p.error(f"--peer: {v!r} is not one of {', '.join(VARIANTS)}")
  for m in args.torch_malloc.split(","):
    if m not in MALLOC_SETTINGS:
      p.error(f"--torch_malloc: {m!r} is not one of {', '.join(MALLOC_SETTINGS)}")
  try:
    if any(t < 0 for t in _ints(args.torch_threads)):
      raise ValueError
  except ValueError:
    p.error(f"--torch_threads: {args.torch_threads!r} is not a comma list of counts >= 0")
  from bepa_jax import host_memory
  host_memory.configure(args.host_malloc)  # before XLA starts its threads
  import logging
  logging.getLogger("bepa").setLevel(logging.WARNING)
  import harness
  source, data_name = data_source(args.data)
  out = dict(machine=harness.machine_info(), reps=args.reps, warmup=args.warmup,
             data=data_name, family=args.family, peer=args.peer, torch_malloc=args.torch_malloc,
             torch_threads=args.torch_threads,
             host_malloc=args.host_malloc, host_malloc_applied=host_memory.applied(),
             results=[])
  print(f"machine: {out['machine']}\ndata: {data_name} ({source})")
  with tempfile.TemporaryDirectory(prefix="authors_step_") as tmp:
    for n in names:
      tok = tokenizer_path(source, CONFIGS[n]["vocab"], args.cache)
      for m in modes:
        res = run_config(n, m, args, source, tok, tmp)
        out["results"].append(res)
        print(f"== {n}/{m}: compile {res['compile_s']:.1f}s, real tokens/step "
              f"{res['real_tokens_per_step']:.0f}, step-0 loss "
              + ", ".join(f"{k} {v[0]:.4f}" for k, v in res["losses"].items()), flush=True)
  out["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
  table = summary(out["results"])
  out["table"] = table
  print("\n" + table)
  tag = args.tag or "_".join(names + (modes if modes != ["pair"] else [])
                             + ([args.family] if args.family != "bert" else []))
  print("saved", harness.save_json(f"authors_step_{tag}.json", out, args.results_dir))
  png = plot(out, os.path.join(args.results_dir, f"authors_step_{tag}.png"))
  if png:
    print("saved", png)


if __name__ == "__main__":
  main()
