"""`bepa-export`: a bepa-train workdir -> a HuggingFace directory (bepa_jax/hf/export.py).

  bepa-export --workdir DIR [--step N] [--pooling cls|mean] --out HF_DIR

The directory is a transformers *ForMaskedLM with its tokenizer, a sentence-transformers model
(SentenceTransformer(HF_DIR).encode = bepa-eval's embeddings) and a model card (README.md).
"""
from __future__ import annotations

import argparse

from bepa_jax.cli import common as cli


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="bepa-export", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a bepa-train workdir with checkpoints")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--out", required=True, help="new HF directory to write")
  p.add_argument("--pooling", choices=("cls", "mean"), default=None,
                 help="sentence-transformers pooling (default: cls, the L2-normalised [CLS] "
                 "BEPA trains; a run from a sentence-transformers model keeps its own)")
  p.add_argument("--base-model", default=None,
                 help="Hub id the model card names as base_model (default: from init.hf_dir)")
  args = p.parse_args(argv)

  def body():
    from bepa_jax.hf.export import export
    # user paths made absolute once (Orbax refuses relative checkpoint paths)
    out = export(cli.absolute(args.workdir), cli.absolute(args.out), args.step,
                 pooling=args.pooling, base_model=args.base_model)
    print(f"exported {args.workdir} -> {out} (transformers, sentence-transformers, README.md)")
  return cli.guarded("bepa-export", body)


run = cli.entry(main)


if __name__ == "__main__":
  run()
