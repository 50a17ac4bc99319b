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
from repro_multi30k import (LANGS, SHARED, combine_pngs, table, train_source,  # noqa: E402
                            train_tokenizer)

VARIANTS = {  # name -> (loss.weight, loss.cls_input, loss.mlm_input)
    "(a) MLM only": (0.0, "masked", "sentence"),
    "(b) [CLS] of masked input": (1.0, "masked", "sentence"),
    "(c) clean [CLS] + MLM": (1.0, "clean", "sentence"),
    "(d) clean [CLS] + TLM": (1.0, "clean", "pair"),
}


def base_config(args, source, tokenizer_path=None, hf_dir=None):
  from bepa_jax.config import defaults as default_config
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
  from bepa_jax.config import defaults as default_config
  from bepa_jax import mesh as mesh_lib
  from bepa_jax.eval import embed, suite
  from bepa_jax.model import BepaEncoder
  mesh_cfg = default_config.get_config().mesh
  mesh = mesh_lib.create_mesh(mesh_cfg)
  embedder = embed.Embedder(BepaEncoder(model_cfg), params, tokenizer, mesh,
                            max_length=max_length, batch_size=128,
                            rules=mesh_lib.rules(mesh_cfg))
  return suite.run(embedder, sets, margin="ratio")


def parity_texts(m30k: str, per_lang: int = 16) -> list[str]:
  """Real sentences for the export check: the first `per_lang` of Multi30k test in each language."""
  import gzip
  texts = []
  for lang in LANGS:
    with gzip.open(os.path.join(m30k, f"test_2016_flickr.{lang}.gz"), "rt") as f:
      texts += [next(f).strip() for _ in range(per_lang)]
  return texts


def export_parity(workdir: str, out_dir: str, texts: list[str]) -> dict:
  """bepa-export the run, load it in transformers (and sentence-transformers when installed) and
  compare with our encoder on `texts`: max |diff| of the last-layer [CLS] and of the mean-pooled,
  L2-normalised sentence embedding; plus how many texts the exported tokenizer splits differently
  from ours."""
  import numpy as np
  import torch
  import transformers
  from bepa_jax import loading
  from bepa_jax.hf import export, files
  from bepa_jax.model import BepaEncoder
  export.export(workdir, out_dir)
  transformers.logging.set_verbosity_error()
  loaded = loading.load_workdir(workdir)
  tok = transformers.AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
  ours_tok = loaded.tokenizer
  ids_differ = sum(tok(t)["input_ids"] != [ours_tok.cls_id] + ours_tok.encode_batch([t])[0]
                   + [ours_tok.sep_id] for t in texts)
  length = files.st_max_seq_length(out_dir) or 128  # where SentenceTransformer(out_dir) cuts
  batch = tok(texts, padding=True, truncation=True, max_length=length, return_tensors="np")
  out = BepaEncoder(loaded.model_cfg).apply({"params": loaded.params}, batch["input_ids"],
                                            batch.get("token_type_ids"), batch["attention_mask"])
  cls, hidden = np.asarray(out["cls"]), np.asarray(out["hidden"], np.float64)
  m = batch["attention_mask"][..., None]
  mean = (hidden * m).sum(1) / m.sum(1)
  mean /= np.linalg.norm(mean, axis=1, keepdims=True)
  model = transformers.AutoModel.from_pretrained(out_dir, local_files_only=True).eval()
  with torch.no_grad():
    theirs = model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state
  result = {"texts": len(texts), "tokenizer_ids_differ": int(ids_differ),
            "transformers_cls_max_abs_diff": float(np.abs(theirs[:, 0].numpy() - cls).max())}
  try:
    import sentence_transformers as st
  except ImportError:
    result["sentence_transformers"] = "not installed"
  else:  # the export's modules: [CLS] (or the modules of the model the run started from)
    enc = st.SentenceTransformer(out_dir, device="cpu", local_files_only=True)
    emb = enc.encode(texts, convert_to_numpy=True, batch_size=len(texts), normalize_embeddings=True)
    ref = mean if files.st_pooling(out_dir) == "mean" else cls / np.linalg.norm(
        cls.astype(np.float64), axis=1, keepdims=True)
    result["sentence_transformers_max_abs_diff"] = float(np.abs(emb - ref).max())
  diffs = [v for k, v in result.items() if k.endswith("max_abs_diff")]
  result["within_1e-5"] = bool(max(diffs) <= 1e-5)
  return result


def step_costs(configs: dict, root: str, reps: int) -> dict:
  """ms per step of each variant, timed interleaved on the same real batches (one step of each
  in turn, so load on a shared machine hits all alike); real tokens = the x and y sentences'
  tokens incl. [CLS]/[SEP], the same count for every variant."""
  import jax
  import harness
  from bepa_jax.trainer import build as build_lib
  from bepa_jax.trainer import loop
  fns, tokens = {}, {}
  for name, config in configs.items():
    job = build_lib.build(config, os.path.join(root, "step_cost", name[1]), jax.devices()[:1])
    host = [job.pipeline.batch(s) for s in range(reps + 1)]
    tokens[name] = sum(int(b["attention_mask"].sum()) for b in host) / len(host)
    device = [loop.global_batch(b, job.mesh) for b in host]
    with jax.set_mesh(job.mesh):
      compiled = job.step_fn.lower(job.state, device[0]).compile()
    holder = {"state": job.state, "i": 0}

    def run(holder=holder, device=device, compiled=compiled, mesh=job.mesh):
      with jax.set_mesh(mesh):
        holder["state"], metrics = compiled(holder["state"], device[holder["i"] % len(device)])
      holder["i"] += 1
      jax.block_until_ready(metrics)
    fns[name] = run
  times = harness.interleaved(fns, reps, warmup=1)
  out = {}
  for name, ts in times.items():
    med = harness.median(ts)
    out[name] = {"ms_median": 1e3 * med, "ms_fastest": 1e3 * min(ts),
                 "real_tokens_per_s": tokens[name] / med, "reps": len(ts)}
  ref = out.get("(b) [CLS] of masked input")
  for r in out.values():
    r["vs_one_pass"] = r["ms_median"] / ref["ms_median"] if ref else None
  return out


def run_variant(config, workdir, sets, max_length):
  from bepa_jax.trainer import loop
  from bepa_jax.data import factory
  from bepa_jax.hf import init as hf_init
  from bepa_jax.model import EncoderConfig
  t = time.time()
  state, metrics = loop.train(config, workdir)
  seconds = time.time() - t
  tok = factory.load_tokenizer(config, workdir, train_if_missing=False,
                               hf_dir=hf_init.tokenizer_dir(config))
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
  p.add_argument("--time_reps", type=int, default=10,
                 help="interleaved step-cost repetitions after training (0: skip)")
  p.add_argument("--no_parity", action="store_true",
                 help="skip exporting each run and checking it in transformers")
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
  from bepa_jax import loading
  from bepa_jax.eval import diagnostics, retrieval

  t0 = time.time()
  root = args.workdir or tempfile.mkdtemp(prefix="objective_study_")
  source = train_source(args.m30k)
  test_files = [os.path.join(args.m30k, f"test_2016_flickr.{l}.gz") for l in LANGS]
  sets = [retrieval.read_tatoeba(tatoeba, l) for l in ("deu", "fra", "ces")]
  sets.append(retrieval.read_parallel(test_files, name="multi30k"))
  spm = hf_dir = None
  if kind != "hf":
    spm = os.path.join(root, "tokenizer", "spm.model")
    if not os.path.exists(spm) and train_tokenizer(source, args.vocab_size,
                                                   os.path.dirname(spm)):
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
  texts = parity_texts(args.m30k)
  configs = {}
  for name, (weight, cls_input, mlm_input) in VARIANTS.items():
    if name[1] not in wanted:
      continue
    config = base_config(args, source, tokenizer_path=spm, hf_dir=hf_dir)
    config.loss.weight, config.loss.cls_input, config.loss.mlm_input = weight, cls_input, \
        mlm_input
    workdir = os.path.join(root, f"variant_{name[1]}")
    configs[name] = config
    reports[name], plots[name] = run_variant(config, workdir, sets, args.max_length)
    if not args.no_parity:
      reports[name]["export_parity"] = export_parity(workdir, workdir + "_hf", texts)
      logging.info("%s: export parity %s", name, reports[name]["export_parity"])
    logging.info("%s: trained in %.0f s (%.1f ms/step), evaluated", name,
                 reports[name]["train"]["seconds"], reports[name]["train"]["ms_per_step"] or 0)

  if args.time_reps and configs:
    costs = step_costs({n: c.copy_and_resolve_references() for n, c in configs.items()}, root,
                       args.time_reps)
    for name, cost in costs.items():
      reports[name]["step_cost"] = cost
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
  def cell(r, *keys, fmt="{:.0f}"):
    for k in keys[:-1]:
      r = r.get(k) or {}
    v = r.get(keys[-1])
    return "-" if v is None or isinstance(v, str) else fmt.format(v)
  step_row = "\n".join([
      "| ms / step (interleaved, median) | " + " | ".join(
          cell(r, "step_cost", "ms_median") for r in reports.values()) + " |",
      "| step time vs (b) one pass | " + " | ".join(
          cell(r, "step_cost", "vs_one_pass", fmt="{:.2f}x") for r in reports.values()) + " |",
      "| real tokens / s | " + " | ".join(
          cell(r, "step_cost", "real_tokens_per_s") for r in reports.values()) + " |",
      "| export vs transformers, [CLS] max abs diff | " + " | ".join(
          cell(r, "export_parity", "transformers_cls_max_abs_diff", fmt="{:.1e}")
          for r in reports.values()) + " |",
      "| export vs sentence-transformers, max abs diff | " + " | ".join(
          cell(r, "export_parity", "sentence_transformers_max_abs_diff", fmt="{:.1e}")
          for r in reports.values()) + " |"])
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
