"""`bepa-export`: a bepa-train workdir -> a HuggingFace directory (bepa_jax/hf/export.py).

  bepa-export --workdir DIR [--step N] --out HF_DIR
"""
from __future__ import annotations

import argparse

from bepa_jax.cli import common as cli
from bepa_jax.hf.export import export


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="bepa-export", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a bepa-train workdir with checkpoints")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--out", required=True, help="new HF directory to write")
  args = p.parse_args(argv)

  def body():
    # user paths made absolute once (Orbax refuses relative checkpoint paths)
    out = export(cli.absolute(args.workdir), cli.absolute(args.out), args.step)
    print(f"exported {args.workdir} -> {out}")
  return cli.guarded("bepa-export", body)


run = cli.entry(main)


if __name__ == "__main__":
  run()
