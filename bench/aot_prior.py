"""The full search's likeliest winner first, for the pod-table cells it has not reached.

  python bench/aot_prior.py [--jobs 2] [--budget_s 6000] [--match REGEX] [--dry]
  python bench/aot_table.py --docs     # then: the table from every report on disk

`bench/aot_table.py --run` searches a cell's whole pruned grid (5-20 compiles of 1-14 minutes
each on a 2-core VM: ~10 hours for the table). In every cell it searched, the winner was the
cell's fitting plan with the optimizer sharded (ZeRO-1) and the layers unrolled, plus the
MLM loss in vocabulary chunks for a 250k vocabulary (docs/pods.md). This compiles that one
plan -- derived from each cell's fastest plan on disk -- for every cell whose search is not
complete, `--jobs` cells at a time (each compile its own `bepa-compile` child, as the search's
are). The reports land where the search looks for them (bench/results/aot/CELL__PLAN.json),
so the table ranks them with the rest and a later full search does not compile them again.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aot_table  # noqa: E402  (bench/ is not a package)


def prior_plan(cell):
  """The cell's fastest plan on disk with ZeRO-1 (unless fsdp), unrolled layers, threefry
  dropout (the scanned-layer crash does not occur unrolled) and, for a vocabulary of >= 64k,
  MLM vocabulary chunks; None where no plan fits yet. (If XLA:TPU crashes on it, `todo` offers
the same plan with rbg dropout, the search's way out.)"""
  from bepa_jax.aot import search as search_lib
  s = aot_table.search_cell(cell)
  ranked = s.ranked()
  if not ranked or cell == aot_table.OVERSIZED:
    return None
  best = ranked[0]["plan"]
  big_vocab = s.shape.vocab >= search_lib.LARGE_VOCAB
  return dataclasses.replace(
      best, sharding="zero1" if best.sharding == "data" else best.sharding, scan_layers=False,
      dropout_rng=search_lib.THREEFRY,
      mlm_vocab_chunk=search_lib.VOCAB_CHUNK if big_vocab else best.mlm_vocab_chunk)


def todo(match: str) -> list[tuple]:
  """(cell, plan) to compile: cells in the search's order whose prior is not on disk."""
  from bepa_jax.aot import search as search_lib
  from bepa_jax.config import validate as config_lib
  from bepa_jax.errors import ConfigError
  out = []
  for cell in aot_table.search_order():
    if not re.search(match, aot_table.cell_label(cell)):
      continue
    plan = prior_plan(cell)
    if plan is None:
      continue
    done = aot_table.load(aot_table.plan_path(cell, plan))
    if done is not None and done.get("failed") in search_lib.CRASHED:
      plan = dataclasses.replace(plan, dropout_rng=search_lib.RBG)  # the crash's way out
      done = aot_table.load(aot_table.plan_path(cell, plan))
    if done is not None:
      continue
    try:
      config_lib.validate(search_lib.plan_config(aot_table.cell_config(cell), plan),
                          aot_table.chips(cell[2]))
    except ConfigError as e:
      print(f"{aot_table.cell_label(cell)}: {plan.describe()}: invalid here ({e})")
      continue
    aot_table.args_for(cell, plan)  # the packing probe, once, before the threads start
    out.append((cell, plan))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="bench/aot_prior.py", description=__doc__.splitlines()[0])
  p.add_argument("--jobs", type=int, default=2, help="compiles at once (one core each)")
  p.add_argument("--budget_s", type=float, default=6000, help="start no compile after")
  p.add_argument("--timeout_s", type=float, default=1800, help="per compile")
  p.add_argument("--nice", type=int, default=10)
  p.add_argument("--match", default="", help="only cells whose name matches this regex")
  p.add_argument("--dry", action="store_true", help="list the plans, compile nothing")
  args = p.parse_args(argv)
  from bepa_jax.aot import search as search_lib
  plans = todo(args.match)
  for cell, plan in plans:
    print(f"{aot_table.cell_label(cell)}: {plan.describe()}", flush=True)
  if args.dry or not plans:
    print(f"{len(plans)} plan(s) to compile")
    return 0
  deadline = time.time() + args.budget_s

  def one(item):
    cell, plan = item
    rep = aot_table.compiler(cell, deadline, args.timeout_s, 0, args.nice)(plan)
    return cell, plan, rep

  done = 0
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for cell, plan, rep in pool.map(one, plans):
      done += rep is not None
      s = search_lib.summary(rep)
      figures = (f", {s['gib_per_chip']:.1f} GiB" if "gib_per_chip" in s else "") + (
          f", {s['step_ms']:.1f} ms" if "step_ms" in s else "")
      print(f"{aot_table.cell_label(cell)}: {plan.describe()}: {s['status']}{figures}",
            flush=True)
  print(f"compiled {done} of {len(plans)}; next: python bench/aot_table.py --docs")
  return 0


if __name__ == "__main__":
  sys.exit(main())
