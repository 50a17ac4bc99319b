"""bench/input.py --e2e: bepa-train on 2 local processes, packed, made input-heavy (Tatoeba's
112 languages, data.max_length=256, a tiny model), data.workers=0 and 1 interleaved: what the
worker processes buy end to end, beside input.py's per-cell rates."""
from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TATOEBA = os.path.join(os.path.dirname(REPO), "shared", "data", "tatoeba")
CACHE = os.path.join("/tmp", "bepa_input_bench")  # input.py's too: tokenizers, enlarged corpus

E2E = {"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2,
       "model.intermediate_size": 64, "model.max_position_embeddings": 256,
       "data.max_length": 256, "data.max_predictions_per_seq": 8, "data.packing": True,
       "train.global_batch": 2048, "train.log_every": 5, "checkpoint.every_steps": 0,
       "checkpoint.every_minutes": 0, "data.prefetch": 2}
E2E_VOCAB = 4000  # a small MLM head: the step stays cheap beside the input


def e2e_run(workdir: str, tok_path: str, workers: int, steps: int) -> float:
  """steps/s of a 2-process packed bepa-train (compilation excluded: bepa-train's own figure,
  from its second log on)."""
  from launch.local import run_local
  cfg = {**E2E, "data.source": f"tatoeba:{TATOEBA}", "tokenizer.path": tok_path,
         "train.steps": steps, "data.workers": workers}
  cmd = [sys.executable, "-m", "bepa_jax.cli.train", "--workdir", workdir,
         *[f"--config.{k}={v}" for k, v in cfg.items()]]
  rc = run_local(cmd, num_processes=2, devices_per_process=1, log_dir=workdir + "_logs",
                 stream=open(os.devnull, "w"), cwd=REPO, timeout_s=1200,
                 env={"PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get(
                     "PYTHONPATH", "")) if p)})
  if rc != 0:
    raise SystemExit(f"e2e run failed (exit {rc}): see {workdir}_logs/worker_0.log")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last = [json.loads(line) for line in f if "train/steps_per_sec" in line][-1]
  return float(last["train/steps_per_sec"])


def run_e2e(args) -> dict:
  """data.workers=0 and 1, interleaved, `--e2e_rounds` times each, in one session."""
  import tempfile
  from bepa_jax.config import defaults as default_config
  from bepa_jax.data import factory
  from bepa_jax.data import tokenizer as tokenizer_lib
  out = os.path.join(CACHE, f"spm{E2E_VOCAB}_tatoeba")
  if not os.path.exists(os.path.join(out, "spm.model")):
    d = default_config.get_config().data
    d.source, d.pairs = f"tatoeba:{TATOEBA}", ""
    tokenizer_lib.train_sentencepiece(factory.training_texts(d), out, E2E_VOCAB)
  root = tempfile.mkdtemp(prefix="bepa-input-e2e-")
  runs = {0: [], 1: []}
  for k in range(args.e2e_rounds):
    for workers in (0, 1):
      rate = e2e_run(os.path.join(root, f"w{workers}_{k}"), os.path.join(out, "spm.model"),
                     workers, args.e2e_steps)
      runs[workers].append(rate)
      print(f"e2e round {k + 1}: data.workers={workers}: {rate:.3f} steps/s", flush=True)
  best = {w: max(v) for w, v in runs.items()}
  return dict(config={**E2E, "data.source": "tatoeba (112 languages x eng)",
                      "processes": 2, "devices_per_process": 1, "steps": args.e2e_steps},
              steps_per_s=runs, speedup=best[1] / best[0])
