"""Input throughput vs train-step throughput, same config: is the host the bottleneck?

Reads Multi30k train (en/de/fr/cs, gzip) through the file source + PairPipeline (dedup,
tokenisation, MLM masking) pinned to ONE core, then times the jitted train step of the same
config. Prints pairs/s and tokens/s of both and writes bench/results/input.json.

  python bench/input.py [--steps 40] [--global-batch 64] [--max-length 64]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "multi30k")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--train-steps", type=int, default=8)
  ap.add_argument("--global-batch", type=int, default=64)
  ap.add_argument("--max-length", type=int, default=64)
  ap.add_argument("--vocab-size", type=int, default=8000)
  ap.add_argument("--tokenizer", default="", help="existing spm.model (else trained, ~1 min)")
  args = ap.parse_args()
  if not os.path.isdir(DATA):
    print(f"skip: {DATA} is absent")
    return 0
  import jax
  from bepa_jax.config import defaults as default_config
  from bepa_jax.trainer import build as build_lib
  from bepa_jax.trainer import loop
  from bepa_jax.data import factory as data_factory

  c = default_config.get_config()
  c.data.source = f"aligned:{DATA}/train.{{en,de,fr,cs}}"
  c.data.max_length = args.max_length
  c.model.max_position_embeddings = max(c.model.max_position_embeddings, args.max_length)
  c.data.max_predictions_per_seq = max(1, round(args.max_length * 0.15))
  c.tokenizer.vocab_size = args.vocab_size
  c.tokenizer.path = args.tokenizer
  c.train.global_batch = args.global_batch
  c.train.steps = args.train_steps + 2
  workdir = tempfile.mkdtemp(prefix="bepa-bench-input-")

  t0 = time.perf_counter()
  tok = data_factory.load_tokenizer(c, workdir)
  t_tok = time.perf_counter() - t0
  t0 = time.perf_counter()
  pipe = data_factory.build_pipeline(c, tok)
  t_load = time.perf_counter() - t0

  # --- input side on one core (sentencepiece's threads share it)
  affinity = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(affinity)})
  pipe.batch(0)
  t0 = time.perf_counter()
  ntok = 0
  for s in range(1, args.steps + 1):
    b = pipe.batch(s)
    ntok += int(b["attention_mask"].sum())
  dt = time.perf_counter() - t0
  os.sched_setaffinity(0, affinity)
  in_pairs = args.steps * args.global_batch / dt
  in_tokens = ntok / dt

  # --- train step of the same config on this machine's devices
  job = build_lib.build(c, workdir)
  state = job.state
  with jax.set_mesh(job.mesh):
    batches = [loop.global_batch(pipe.batch(s), job.mesh) for s in range(args.train_steps + 1)]
    state, m = job.step_fn(state, batches[0])
    jax.block_until_ready(m)                             # compile
    t0 = time.perf_counter()
    for bt in batches[1:]:
      state, m = job.step_fn(state, bt)
    jax.block_until_ready(m)
    dt_step = (time.perf_counter() - t0) / args.train_steps
  step_pairs = args.global_batch / dt_step
  step_tokens = args.global_batch * 2 * args.max_length / dt_step

  res = dict(device=str(jax.devices()[0].platform), n_devices=jax.device_count(),
             global_batch=args.global_batch, max_length=args.max_length,
             model=dict(hidden=c.model.hidden_size, layers=c.model.num_layers),
             tokenizer_train_s=t_tok, source_load_s=t_load,
             input_pairs_per_s=in_pairs, input_real_tokens_per_s=in_tokens,
             input_padded_tokens_per_s=in_pairs * 2 * args.max_length,
             train_pairs_per_s=step_pairs, train_padded_tokens_per_s=step_tokens,
             headroom=in_pairs / step_pairs, report=pipe.report())
  print(f"multi30k train: {len(pipe.components)} language pairs, loaded in {t_load:.1f}s "
        f"(tokenizer {t_tok:.1f}s); {pipe.report()}")
  print(f"{'':24s}{'pairs/s':>12s}{'tokens/s':>14s}")
  print(f"{'input (1 core)':24s}{in_pairs:12.0f}{in_tokens:14.0f}  (real tokens; "
        f"{in_pairs * 2 * args.max_length:.0f} padded)")
  print(f"{'train step (' + res['device'] + ' x' + str(res['n_devices']) + ')':24s}"
        f"{step_pairs:12.0f}{step_tokens:14.0f}  (padded tokens)")
  print(f"input / train = {res['headroom']:.1f}x")
  os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
  with open(os.path.join(REPO, "bench", "results", "input.json"), "w") as f:
    json.dump(res, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
