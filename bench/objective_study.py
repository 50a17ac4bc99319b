"""Study of the objective options on real data: (a) MLM only, (b) [CLS] from the masked input,
(c) clean [CLS] + per-sentence MLM, (d) clean [CLS] + TLM pair MLM. Same steps, batches and
seed for all; Multi30k train (en/de/fr/cs); evaluated on Multi30k test_2016 (every pair) and
Tatoeba deu/fra/ces, with the [CLS] diagnostics (PC1 share, effective rank, alignment,
uniformity), the final MLM loss and the step time.

  python bench/objective_study.py --start scratch                  # tiny model, own tokenizer
  python bench/objective_study.py --start hf:DIR                   # continued pretraining of a
                                                                   # local HF checkpoint
  python bench/objective_study.py --start mlm:STEPS                # first pretrain an MLM-only
                                                                   # model here, export, go on

`--start hf:DIR` also evaluates DIR before any training ("before"). `--start mlm:STEPS` trains
the tiny (or --hidden/--layers) model with lambda=0 on the monolingual sides of the training
data for STEPS steps, logging [CLS] PC1 share and effective rank as it goes
(objective_study_mlm_pretrain.{json,png}), exports it with bepa-export, then runs (a)-(d) from
it as from any HF checkpoint. Results: bench/results/objective_study_<start>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
from repro_multi30k import LANGS, SHARED, combine_pngs, table, train_source  # noqa: E402

VARIANTS = {  # name -> (loss.weight, loss.cls_input, loss.mlm_input)
    "(a) MLM only": (0.0, "masked", "sentence"),
    "(b) [CLS] of masked input": (1.0, "masked", "sentence"),
    "(c) clean [CLS] + MLM": (1.0, "clean", "sentence"),
    "(d) clean [CLS] + TLM": (1.0, "clean", "pair"),
}


def base_config(args, source, tokenizer_path=None, hf_dir=None):
  from bepa_jax import default_config
  c = default_config.get_config()
  c.model.hidden_size, c.model.num_layers = args.hidden, args.layers
  c.model.num_heads, c.model.intermediate_size = max(args.hidden // 32, 1), 4 * args.hidden
  c.model.max_position_embeddings = max(64, args.max_length)
  if hf_dir:
    c.init.hf_dir = hf_dir  # shape and tokenizer come from the checkpoint
  else:
    c.tokenizer.path = tokenizer_path
  c.data.source = source
  c.data.max_length = args.max_length
  c.data.max_predictions_per_seq = max(2, round(0.15 * args.max_length))
  c.train.steps = args.steps
  c.train.global_batch = args.global_batch
  c.train.log_every = max(args.steps // 10, 1)
  c.optim.warmup_steps = max(args.steps // 20, 1)
  c.optim.learning_rate = args.learning_rate
  c.checkpoint.every_steps = args.steps
  c.checkpoint.every_minutes = 0
  c.checkpoint.keep = 1
  return c


def evaluate(model_cfg, params, tokenizer, sets, max_length):
  from bepa_jax import default_config
  from bepa_jax import mesh as mesh_lib
  from bepa_jax.eval import embed, suite
  from bepa_jax.model import BepaEncoder
  mesh_cfg = default_config.get_config().mesh
  mesh = mesh_lib.create_mesh(mesh_cfg)
  embedder = embed.Embedder(BepaEncoder(model_cfg), params, tokenizer, mesh,
                            max_length=max_length, batch_size=128,
                            rules=mesh_lib.rules(mesh_cfg))
  return suite.run(embedder, sets, margin="ratio")


def run_variant(config, workdir, sets, max_length):
  from bepa_jax import train
  from bepa_jax.data import factory
  from bepa_jax.model import EncoderConfig
  t = time.time()
  state, metrics = train.train(config, workdir)
  seconds = time.time() - t
  tok = factory.load_tokenizer(config, workdir, train_if_missing=False)
  model_cfg = EncoderConfig.from_config(config.model, vocab_size=tok.vocab_size)
  report, plot = evaluate(model_cfg, state.params, tok, sets, max_length)
  steps_per_s = float(metrics.get("steps_per_sec", float("nan")))
  report["train"] = {**{k: float(v) for k, v in metrics.items()}, "seconds": seconds,
                     "ms_per_step": 1000.0 / steps_per_s if steps_per_s > 0 else None,
                     "workdir": workdir}
  return report, plot


def mlm_pretrain(args, source, spm, root, sets):
  """lambda=0 on the monolingual sides; PC1 share / effective rank along the way; HF export."""
  from bepa_jax.hf import export
  mono = "; ".join(f"mono:{l}={args.m30k}/train.{l}.gz" for l in LANGS)
  c = base_config(args, mono, tokenizer_path=spm)
  c.loss.weight = 0.0
  c.train.steps = args.pretrain_steps
  c.train.log_every = max(args.pretrain_steps // 20, 1)
  c.optim.warmup_steps = max(args.pretrain_steps // 20, 1)
  c.checkpoint.every_steps = args.pretrain_steps
  c.eval.every_steps = max(args.pretrain_steps // 10, 1)
  c.eval.parallel = ",".join(os.path.join(args.m30k, f"test_2016_flickr.{l}.gz") for l in LANGS)
  c.eval.max_sentences = 250
  c.eval.pooling = "cls"
  workdir = os.path.join(root, "mlm_pretrain")
  run_variant(c, workdir, sets, args.max_length)
  curve = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      pc1 = r.get("eval/diagnostics/cls/pc1_share")
      if pc1 is not None:
        curve.append({"step": r["step"], "pc1_share": pc1,
                      "effective_rank": r.get("eval/diagnostics/cls/effective_rank")})
  hf_dir = os.path.join(root, "mlm_pretrain_hf")
  export.export(workdir, hf_dir)
  return hf_dir, curve


def plot_curve(curve, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
  steps = [c["step"] for c in curve]
  ax[0].plot(steps, [100 * c["pc1_share"] for c in curve], marker="o")
  ax[0].set(xlabel="step", ylabel="[CLS] PC1 variance share (%)", title="MLM-only pretraining")
  ax[1].plot(steps, [c["effective_rank"] for c in curve], marker="o", color="C1")
  ax[1].set(xlabel="step", ylabel="effective rank")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--start", default="scratch", help="scratch | hf:DIR | mlm:STEPS")
  p.add_argument("--data", default=SHARED, help="dir holding multi30k/ and tatoeba/")
  p.add_argument("--variants", default="a,b,c,d")
  p.add_argument("--steps", type=int, default=1200)
  p.add_argument("--global_batch", type=int, default=32)
  p.add_argument("--max_length", type=int, default=24)
  p.add_argument("--learning_rate", type=float, default=2e-3)
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--vocab_size", type=int, default=2000)
  p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
  p.add_argument("--workdir", default="", help="keep the training workdirs here")
  args = p.parse_args(argv)
  args.m30k, tatoeba = os.path.join(args.data, "multi30k"), os.path.join(args.data, "tatoeba")
  if not (os.path.isdir(args.m30k) and os.path.isdir(tatoeba)):
    print(f"objective_study: error: need {args.m30k} and {tatoeba}", file=sys.stderr)
    return 2
  kind, _, value = args.start.partition(":")
  if kind not in ("scratch", "hf", "mlm") or (kind != "scratch" and not value):
    print(f"objective_study: error: --start {args.start}: expected scratch, hf:DIR or "
          f"mlm:STEPS", file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  import jax
  from bepa_jax.data import tokenizer_cli
  from bepa_jax.eval import diagnostics, loading, retrieval

  t0 = time.time()
  root = args.workdir or tempfile.mkdtemp(prefix="objective_study_")
  source = train_source(args.m30k)
  test_files = [os.path.join(args.m30k, f"test_2016_flickr.{l}.gz") for l in LANGS]
  sets = [retrieval.read_tatoeba(tatoeba, l) for l in ("deu", "fra", "ces")]
  sets.append(retrieval.read_parallel(test_files, name="multi30k"))
  spm = hf_dir = None
  if kind != "hf":
    spm = os.path.join(root, "tokenizer", "spm.model")
    if not os.path.exists(spm) and tokenizer_cli.main(
        ["train", "--input", source, "--vocab-size", str(args.vocab_size), "--out",
         os.path.dirname(spm)]):
      return 2
  reports, plots, extra = {}, {}, {}
  if kind == "mlm":
    args.pretrain_steps = int(value)
    hf_dir, curve = mlm_pretrain(args, source, spm, root, sets)
    extra["mlm_pretrain_curve"] = curve
    os.makedirs(args.out, exist_ok=True)
    plot_curve(curve, os.path.join(args.out, "objective_study_mlm_pretrain.png"))
    with open(os.path.join(args.out, "objective_study_mlm_pretrain.json"), "w") as f:
      json.dump({"steps": args.pretrain_steps, "curve": curve}, f, indent=2)
  elif kind == "hf":
    hf_dir = os.path.abspath(value)
  if hf_dir:
    before = loading.load_hf_dir(hf_dir)
    reports["before"], plots["before"] = evaluate(before.model_cfg, before.params,
                                                  before.tokenizer, sets, args.max_length)
    reports["before"]["train"] = {"mlm_loss": float("nan")}
  wanted = {v.strip() for v in args.variants.split(",")}
  for name, (weight, cls_input, mlm_input) in VARIANTS.items():
    if name[1] not in wanted:
      continue
    config = base_config(args, source, tokenizer_path=spm, hf_dir=hf_dir)
    config.loss.weight, config.loss.cls_input, config.loss.mlm_input = weight, cls_input, \
        mlm_input
    workdir = os.path.join(root, f"variant_{name[1]}")
    reports[name], plots[name] = run_variant(config, workdir, sets, args.max_length)
    logging.info("%s: trained in %.0f s (%.1f ms/step), evaluated", name,
                 reports[name]["train"]["seconds"], reports[name]["train"]["ms_per_step"] or 0)

  tag = {"scratch": "scratch", "hf": os.path.basename(os.path.normpath(value or "")),
         "mlm": f"mlm{value}"}[kind]
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, f"objective_study_{tag}")
  settings = {k: v for k, v in vars(args).items() if k not in ("out", "workdir", "data", "m30k")}
  settings["devices"] = f"{jax.device_count()} x {jax.devices()[0].platform}"
  with open(base + ".json", "w") as f:
    json.dump({"settings": settings, "runs": reports, **extra}, f, indent=2)
  with tempfile.TemporaryDirectory() as tmp:
    pngs = diagnostics.save_plots({n: p["cls"] for n, p in plots.items()}, tmp)
    combine_pngs(pngs, base + ".png")
  cmd = ("python bench/objective_study.py " + " ".join(argv if argv is not None
                                                       else sys.argv[1:])).strip()
  step_row = "| ms / step | " + " | ".join(
      f"{r['train'].get('ms_per_step') or float('nan'):.0f}" for r in reports.values()) + " |"
  md = (f"# Objective study ({args.start})\n\n`{cmd}`: {args.steps} steps x "
        f"{args.global_batch} pairs, max_length {args.max_length}, {settings['devices']}; "
        f"total {time.time() - t0:.0f} s.\n\n{table(reports)}\n{step_row}\n")
  with open(base + ".md", "w") as f:
    f.write(md)
  print(md)
  print(f"wrote {base}.json, .md, .png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
