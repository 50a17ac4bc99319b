"""`bepa-eval`: retrieval accuracy and embedding-space diagnostics of one or two checkpoints.

  bepa-eval --workdir DIR --tatoeba TATOEBA_DIR --langs deu,fra,ces --out DIR
  bepa-eval --hf-dir DIR --parallel test.de.gz test.en.gz --margin ratio
  bepa-eval --compare RUN_A RUN_B --tatoeba DIR --langs deu,fra     (workdirs or HF dirs)

Writes report.json, summary.md and spectrum.png / map.png / similarity_hist.png to --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from bepa_jax.cli import common as cli

PROG = "bepa-eval"


def parse_args(argv):
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a bepa-train workdir (config.json, tokenizer, checkpoints)")
  src.add_argument("--hf-dir", help="an HF BertForMaskedLM / XLMRobertaForMaskedLM directory")
  src.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="two workdirs or HF dirs, evaluated side by side in one report")
  p.add_argument("--tatoeba", help="LASER-layout Tatoeba dir (tatoeba.xxx-eng.{xxx,eng}), or "
                 "'tfds' / 'tfds:DATA_DIR' for TFDS tatoeba/tatoeba_<lang> (2-letter --langs)")
  p.add_argument("--langs", default="", help="comma-separated Tatoeba languages (default: all)")
  p.add_argument("--parallel", nargs="+", default=[], metavar="FILE",
                 help="two or more line-aligned files (.gz ok); language = last suffix")
  p.add_argument("--out", help="output dir (default: <model dir>/eval)")
  p.add_argument("--max-sentences", type=int, default=1000, help="per set (0 = all)")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--max-length", type=int, default=0,
                 help="tokens per sentence (default: data.max_length of the run, 128 for HF)")
  p.add_argument("--pooling", default="cls,mean", help="cls, mean or both")
  p.add_argument("--margin", choices=("ratio", "distance"),
                 help="also score retrieval with a BUCC margin (k-NN ratio or distance)")
  p.add_argument("--margin-k", type=int, default=4)
  p.add_argument("--tokenizer", help="sentencepiece .model or HF tokenizer dir to use instead")
  p.add_argument("--map-per-lang", type=int, default=100, help="points per language in map.png")
  p.add_argument("--no-tsne", action="store_true", help="PCA map only (t-SNE takes seconds)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if not args.tatoeba and not args.parallel:
    p.error("nothing to evaluate: give --tatoeba DIR and/or --parallel FILE FILE")
  if len(args.parallel) == 1:
    p.error("--parallel needs at least 2 aligned files")
  args.poolings = tuple(x.strip() for x in args.pooling.split(",") if x.strip())
  if not args.poolings or any(x not in ("cls", "mean") for x in args.poolings):
    p.error(f"--pooling must name cls and/or mean, got {args.pooling!r}")
  if args.max_length and args.max_length < 3:
    p.error(f"--max-length must be >= 3 ([CLS] s [SEP]) or 0 (the model's), got {args.max_length}")
  if args.batch_size < 1 or args.max_sentences < 0 or args.margin_k < 1:
    p.error("--batch-size and --margin-k must be >= 1, --max-sentences >= 0")
  _absolute_paths(args)
  return args


def _absolute_paths(args) -> None:
  """The paths given, made absolute once (Orbax refuses relative checkpoint paths); a
  --tokenizer that is no local path (a hub name) and --tatoeba tfds[:DIR] stay as given."""
  for name in ("workdir", "hf_dir", "out"):
    if getattr(args, name):
      setattr(args, name, cli.absolute(getattr(args, name)))
  args.compare = [cli.absolute(p) for p in args.compare] if args.compare else args.compare
  args.parallel = [cli.absolute(p) for p in args.parallel]
  if args.tatoeba and not args.tatoeba.startswith("tfds"):
    args.tatoeba = cli.absolute(args.tatoeba)
  if args.tokenizer and os.path.exists(args.tokenizer):
    args.tokenizer = cli.absolute(args.tokenizer)


def evaluate_model(path: str, sets, args, log):
  """Loads one model, returns (name, report, plot data)."""
  from bepa_jax import loading
  from bepa_jax import mesh as mesh_lib
  from bepa_jax.errors import InputError
  from bepa_jax.eval import embed, suite

  loaded = loading.load(path, args.tokenizer, hf=path == args.hf_dir)
  limit = loading.max_tokens(loaded.model_cfg)
  if args.max_length > limit:  # past the position table the gather gives NaN embeddings
    raise InputError(f"--max-length {args.max_length} exceeds the {limit} tokens {path} can "
                     f"take (max_position_embeddings={loaded.model_cfg.max_position_embeddings})")
  unseen = suite.unseen_languages(loaded.tokenizer, sets)
  if unseen:  # valid but suspect: scored, with one line counting what it could not read
    log.warning("%s: %s", path, unseen)
  mesh, mesh_cfg = embed.inference_mesh(loaded.mesh_cfg)
  max_length = args.max_length or loaded.max_length
  model = loaded.model
  params = embed.shard_params(model, loaded.params, mesh, mesh_cfg, max_length)
  embedder = embed.Embedder(model, params, loaded.tokenizer, mesh, max_length=max_length,
                            batch_size=args.batch_size, rules=mesh_lib.rules(mesh_cfg))
  log.info("%s: %s model, %d sentences per set, max_length %d", path, loaded.model_cfg.family,
           max(len(s) for s in sets), max_length)
  report, plot = suite.run(embedder, sets, poolings=args.poolings, margin=args.margin,
                           k=args.margin_k, seed=args.seed, map_per_lang=args.map_per_lang)
  report["model"] = {"path": os.path.abspath(path), "family": loaded.model_cfg.family,
                     "hidden_size": loaded.model_cfg.hidden_size,
                     "num_layers": loaded.model_cfg.num_layers, "max_length": max_length}
  return loaded.name, report, plot


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cli.setup_logging()
  return cli.guarded(PROG, lambda: _evaluate(args))


def _evaluate(args) -> int:
  log = logging.getLogger("bepa.eval")
  from bepa_jax.eval import diagnostics, suite

  paths = args.compare or [args.workdir or args.hf_dir]
  langs = [l.strip() for l in args.langs.split(",") if l.strip()]
  sets = suite.load_sets(args.tatoeba, langs, args.parallel, args.max_sentences or None)
  reports, plots = {}, {}
  for path in paths:
    name, report, plot = evaluate_model(path, sets, args, log)
    while name in reports:  # two dirs with the same basename
      name += "'"
    reports[name], plots[name] = report, plot
  out = args.out or os.path.join(paths[0], "eval")
  os.makedirs(out, exist_ok=True)
  settings = {k: v for k, v in vars(args).items() if k not in ("poolings",)}
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump({"models": reports, "settings": settings}, f, indent=2)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(suite.markdown(reports))
  pool = "cls" if "cls" in args.poolings else args.poolings[0]
  pngs = diagnostics.save_plots({n: p[pool] for n, p in plots.items()}, out,
                                tsne=not args.no_tsne, seed=args.seed)
  log.info("wrote %s", ", ".join(os.path.join(out, f) for f in
                                 ["report.json", "summary.md"] + [os.path.basename(p) for p in pngs]))
  print(suite.markdown(reports))
  print(f"{PROG}: wrote {os.path.join(out, 'report.json')}, summary.md and {len(pngs)} plots; "
        f"next: `{PROG} --compare A B` puts two models side by side, `bepa-transfer "
        f"--{'hf-dir' if args.hf_dir else 'workdir'} {paths[0]} --task xnli` fine-tunes one")
  return 0


run = cli.entry(main)


if __name__ == "__main__":
  run()
