"""What checkpoint checksums cost: save, checksum, verify and restore of a real train state.

  python bench/checkpoint_verify.py                       # BERT-base-sized state, local disk
  python bench/checkpoint_verify.py --hidden 256 --layers 4 --vocab 32000 --reps 3

Builds the TrainState of a BERT model (params + AdamW moments, filled with dense random values
so nothing compresses away), saves it with the trainer's Checkpointer, then times, per
repetition: the save (Orbax, synchronous), writing checksums.json (integrity.write), verifying
it (integrity.verify: one sequential read and SHA-256 of every file) and a full restore.
Prints MiB/s and the verify time as a fraction of the restore; writes
bench/results/checkpoint_verify.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--hidden", type=int, default=768)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--vocab", type=int, default=30522)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "checkpoint_verify.json"))
  args = p.parse_args()

  import jax
  import numpy as np
  from bepa_jax.trainer import build as build_lib
  from bepa_jax.checkpoint import integrity, store
  from tests.helpers import tiny_config

  root = args.dir or tempfile.mkdtemp(prefix="bepa-ckpt-bench-")
  h = args.hidden
  config = tiny_config(**{
      "model.hidden_size": h, "model.num_layers": args.layers, "model.num_heads": h // 64 or 1,
      "model.intermediate_size": 4 * h, "model.vocab_size": args.vocab,
      "model.max_position_embeddings": 512, "checkpoint.async_save": False,
      "checkpoint.keep": 1, "checkpoint.every_minutes": 0})
  job = build_lib.build(config, os.path.join(root, "build"))
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype)
                       if x.dtype == np.float32 else x, job.state)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=getattr(x, "sharding", None)),
                          store.state_items(job.state))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(store.state_items(state)))
  print(f"state: {nbytes / 2**20:,.1f} MiB (params + AdamW moments), {args.reps} repetitions, "
        f"in {root}")
  rows = []
  for rep in range(args.reps):
    wd = os.path.join(root, f"wd{rep}")
    ckpt = store.Checkpointer(wd, config.checkpoint)
    step_dir = ckpt.directory / "1"
    t0 = time.perf_counter()
    ckpt.manager.save(1, args=store.ocp.args.Composite(
        state=store.ocp.args.StandardSave(store.state_items(state)),
        meta=store.ocp.args.JsonSave({})), force=True)
    ckpt.manager.wait_until_finished()
    t1 = time.perf_counter()
    hashed = integrity.write(step_dir)
    t2 = time.perf_counter()
    verdict = integrity.verify(step_dir)
    t3 = time.perf_counter()
    assert verdict.ok and verdict.checked, verdict
    ckpt.manager.restore(1, args=store.ocp.args.Composite(
        state=store.ocp.args.StandardRestore(abstract), meta=store.ocp.args.JsonRestore()))
    t4 = time.perf_counter()
    ckpt.close()
    rows.append({"save_s": t1 - t0, "checksum_write_s": t2 - t1, "verify_s": t3 - t2,
                 "restore_s": t4 - t3, "bytes_hashed": hashed})
    print(f"rep {rep + 1}: save {t1 - t0:.2f}s | checksums {t2 - t1:.2f}s | verify "
          f"{t3 - t2:.2f}s | restore {t4 - t3:.2f}s | {hashed / 2**20:,.1f} MiB on disk",
          flush=True)
    shutil.rmtree(wd)
  med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
  mib = med["bytes_hashed"] / 2**20
  summary = {
      "state_mib": nbytes / 2**20, "disk_mib": mib, "reps": args.reps, "median": med,
      "verify_mib_per_s": mib / med["verify_s"], "write_mib_per_s": mib / med["checksum_write_s"],
      "verify_over_restore": med["verify_s"] / med["restore_s"],
      "checksum_over_save": med["checksum_write_s"] / med["save_s"],
      "model": {"hidden": h, "layers": args.layers, "vocab": args.vocab},
      "machine": f"{os.cpu_count()} CPUs", "jax": jax.__version__}
  print(f"median: checksums written at {summary['write_mib_per_s']:,.0f} MiB/s "
        f"({100 * summary['checksum_over_save']:.0f}% of the save time), verified at "
        f"{summary['verify_mib_per_s']:,.0f} MiB/s ({100 * summary['verify_over_restore']:.0f}% "
        f"of the restore time)")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(summary, f, indent=2)
  print(f"wrote {args.out}")
  if not args.dir:
    shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
