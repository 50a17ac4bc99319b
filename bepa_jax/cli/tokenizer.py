"""`bepa-tokenizer`: train a sentencepiece model (with [PAD] [UNK] [CLS] [SEP] [MASK]) from sources.

  bepa-tokenizer train --input 'aligned:corpus/train.{en,de,fr,cs}' \
      --vocab-size 8000 --out runs/tok
  bepa-tokenizer encode --model runs/tok/spm.model "Hello world"

--input takes the `data.source` syntax (see bepa_jax/data/sources.py), `;`-separated.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from bepa_jax.cli import common as cli
from bepa_jax.data import sources
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.data import tokenizers as tokenizers_lib
from bepa_jax.errors import BepaError

PROG = "bepa-tokenizer"


def _parser():
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("train", help="train a sentencepiece model from parallel/monolingual sources")
  t.add_argument("--input", required=True, action="append",
                 help="source spec(s), e.g. aligned:DIR/train.{en,de}; tsv:F; jsonl:F; tfds:NAME")
  t.add_argument("--vocab-size", type=int, required=True)
  t.add_argument("--out", required=True, help="output directory (spm.model)")
  t.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
  t.add_argument("--max-sentences", type=int, default=2_000_000,
                 help="distinct sentences fed to the trainer (0 = all)")
  t.add_argument("--pairs", default="", help="language pairs to read, e.g. en-de,en-fr")
  t.add_argument("--invalid-utf8", choices=("error", "skip"), default="error")
  e = sub.add_parser("encode", help="print the ids of texts (a quick check of a model)")
  e.add_argument("--model", required=True)
  e.add_argument("--kind", choices=tokenizers_lib.KINDS, default="spm")
  e.add_argument("text", nargs="+")
  return p


def main(argv=None) -> int:
  p = _parser()
  args = p.parse_args(argv)
  if args.cmd == "train" and args.vocab_size < 8:
    p.error(f"--vocab-size must be >= 8, got {args.vocab_size}")
  if args.cmd == "train" and os.path.exists(args.out) and not os.path.isdir(args.out):
    return cli.fail(PROG, f"--out {args.out}: exists and is not a directory")

  cli.setup_logging(verbose=False)  # the data readers' warning lines, as in bepa-train

  def body():
    if args.cmd == "train":
      policy = sources.TextPolicy(invalid_utf8=args.invalid_utf8)
      comps, _, stats = sources.open_sources(";".join(args.input), policy,
                                             sources.parse_pairs(args.pairs))
      t0 = time.perf_counter()
      path = tokenizer_lib.train_sentencepiece(
          sources.iter_texts(comps, args.max_sentences), args.out, args.vocab_size,
          args.model_type)
      tok = tokenizer_lib.SentencePieceTokenizer(path)
      if tok.vocab_size < args.vocab_size:  # sentencepiece's soft limit: never silent
        print(f"{PROG}: warning: asked for {args.vocab_size} pieces, the text supports "
              f"{tok.vocab_size}: wrote {tok.vocab_size} (give more text or a smaller "
              f"--vocab-size)", file=sys.stderr)
      print(f"{path}: {tok.vocab_size} pieces ({args.model_type}), "
            f"{len(comps)} language pairs, {stats.report()}, {time.perf_counter() - t0:.1f}s")
    else:
      tok = tokenizers_lib.load(args.model, args.kind)
      for text, ids in zip(args.text, tok.encode_batch(args.text)):
        print(" ".join(map(str, ids)))
  # RuntimeError: sentencepiece trainer errors (e.g. vocab too large for the text)
  return cli.guarded(PROG, body, errors=(BepaError, RuntimeError))


run = cli.entry(main)


if __name__ == "__main__":
  run()
