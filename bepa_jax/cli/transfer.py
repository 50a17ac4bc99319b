"""`bepa-transfer`: zero-shot cross-lingual transfer of one checkpoint (fine-tune on English,
evaluate every language).

  bepa-transfer --workdir DIR --task xnli --steps 20000 --out DIR      (MNLI -> XNLI test)
  bepa-transfer --hf-dir DIR --task mlqa --steps 5000                   (SQuAD v1.1 -> MLQA test)
  bepa-transfer --hf-dir DIR --task glue/sst2 --steps 2000              (GLUE validation)
  bepa-transfer --hf-dir DIR --task xnli --train-jsonl mnli.jsonl --eval-jsonl de=de.jsonl
  bepa-transfer --hf-dir DIR --task mlqa-gxlt --mlqa-data MLQA_V1      (all 49 MLQA pairs)
  bepa-transfer --compare A B --out DIR          (two runs' results side by side, B - A)

Writes <task>.json (per-language results, losses, settings) and <task>.md to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from bepa_jax.cli import common as cli

PROG = "bepa-transfer"


def parse_args(argv):
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group()
  src.add_argument("--workdir", help="a bepa-train workdir (config.json, tokenizer, checkpoints)")
  src.add_argument("--hf-dir", help="an HF BertForMaskedLM / XLMRobertaForMaskedLM directory")
  p.add_argument("--task", help="xnli, mlqa, mlqa-gxlt or glue/<task> (cola, sst2, mrpc, qqp, "
                 "stsb, mnli, qnli, rte, wnli); with --compare: which task to compare")
  p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                 help="compare two runs' result JSON files (or their dirs) instead of running")
  p.add_argument("--mlqa-data", help="MLQA's release: a dir of <split>-context-<c>-question-<q>"
                 ".json files (or its <split>/), or a .jsonl with context_lang / question_lang")
  p.add_argument("--mlqa-split", default="test", choices=("test", "dev"),
                 help="which MLQA release files to read")
  p.add_argument("--steps", type=int, default=2000, help="fine-tuning steps")
  p.add_argument("--batch-size", type=int, default=32, help="global batch")
  p.add_argument("--lr", type=float, default=3e-5)
  p.add_argument("--max-length", type=int, default=128)
  p.add_argument("--doc-stride", type=int, default=128, help="span tasks: window stride (tokens)")
  p.add_argument("--langs", default="", help="comma-separated evaluation languages (default: all)")
  p.add_argument("--max-eval", type=int, default=0, help="examples per language (0 = all)")
  p.add_argument("--data-dir", help="TFDS data_dir with the prepared (array_record) datasets")
  p.add_argument("--train-jsonl", help="local training records instead of TFDS")
  p.add_argument("--eval-jsonl", action="append", default=[], metavar="LANG=FILE",
                 help="local evaluation records instead of TFDS (repeat per language; span "
                 "tasks score in LANG, an MLQA language, or 'squad' for SQuAD v1.1)")
  p.add_argument("--num-labels", type=int, default=0, help="classes, if not known from TFDS")
  p.add_argument("--fsdp", type=int, default=1, help="mesh fsdp axis (data = the rest)")
  p.add_argument("--tensor", type=int, default=1, help="mesh tensor axis")
  p.add_argument("--tokenizer", help="sentencepiece .model or HF tokenizer dir to use instead")
  p.add_argument("--out", help="output dir (default: <model dir>/transfer)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.compare:
    if args.workdir or args.hf_dir:
      p.error("--compare reads two runs' results: it takes no --workdir / --hf-dir")
    given = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in
             ("--compare", "--task", "--out")]
    if given:  # a training flag here would do nothing: say so rather than ignore it
      p.error(f"--compare only takes --task and --out; {', '.join(given)} would be ignored")
    args.evals = {}
    return args
  if not (args.workdir or args.hf_dir):
    p.error("one of --workdir, --hf-dir is required (or --compare A B)")
  if not args.task:
    p.error("--task is required")
  if args.steps < 1 or args.batch_size < 1 or args.max_length < 8 or args.max_eval < 0:
    p.error("--steps and --batch-size must be >= 1, --max-length >= 8, --max-eval >= 0")
  if args.doc_stride < 1:
    p.error("--doc-stride must be >= 1")
  evals = {}
  for item in args.eval_jsonl:
    lang, sep, path = item.partition("=")
    if not sep or not lang or not path:
      p.error(f"--eval-jsonl wants LANG=FILE, got {item!r}")
    evals[lang] = path
  args.evals = evals
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  cli.setup_logging()
  if args.compare:
    return cli.guarded(PROG, lambda: _compare(args))
  return cli.guarded(PROG, lambda: _transfer(args))


def _compare(args) -> int:
  from bepa_jax.finetune import compare
  out = args.out or "transfer-compare"
  written = compare.run(args.compare[0], args.compare[1], out, args.task)
  print(f"{PROG}: wrote {', '.join(written)}")
  return 0


def _transfer(args) -> int:
  from bepa_jax import loading
  from bepa_jax.errors import InputError
  from bepa_jax.eval import embed
  from bepa_jax.finetune import report as report_lib
  from bepa_jax.finetune import tasks, trainer

  path = args.workdir or args.hf_dir
  langs = [l.strip() for l in args.langs.split(",") if l.strip()]
  out = args.out or os.path.join(path, "transfer")
  stem = args.task.replace("/", "_")
  taken = [p for p in (os.path.join(out, f"{stem}.{e}") for e in ("json", "md"))
           if os.path.exists(p)]
  if taken:  # checked before hours of fine-tuning, and nothing saved is overwritten
    raise InputError(f"{taken[0]} exists (nothing overwritten): pick another --out")
  task = tasks.get_task(args.task, args.data_dir, langs, args.train_jsonl, args.evals,
                        args.num_labels, args.mlqa_data, args.mlqa_split)
  loaded = loading.load(path, args.tokenizer)
  mesh, mesh_cfg = embed.inference_mesh(loaded.mesh_cfg, args.fsdp, args.tensor)
  limit = loaded.model_cfg.max_position_embeddings - (
      loaded.model_cfg.pad_token_id + 1 if loaded.model_cfg.family == "xlmr" else 0)
  if args.max_length > limit:
    raise InputError(f"--max-length {args.max_length} exceeds the model's {limit} positions")
  report = trainer.run(task, loaded, mesh, mesh_cfg, steps=args.steps,
                       batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                       max_eval=args.max_eval, seed=args.seed, doc_stride=args.doc_stride)
  report["model"] = {"path": os.path.abspath(path), "family": loaded.model_cfg.family}
  report["settings"] = {k: v for k, v in vars(args).items() if k != "evals"}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"{stem}.json"), "w") as f:
    json.dump(report, f, indent=2)
  md = report_lib.markdown(report)
  with open(os.path.join(out, f"{stem}.md"), "w") as f:
    f.write(md)
  print(md)
  print(f"{PROG}: wrote {os.path.join(out, stem)}.json and .md; put two runs side by side with "
        f"`{PROG} --compare A B --out DIR`")
  return 0


run = cli.entry(main)


if __name__ == "__main__":
  run()
