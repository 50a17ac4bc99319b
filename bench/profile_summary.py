"""Where a profiled step spends its time: op durations summed from a jax.profiler trace.

  bepa-train ... --config.train.profile_start=3 --config.train.profile_steps=2 --workdir W
  python bench/profile_summary.py W/profile --steps 2

Sums the XLA ops' events on the compute threads by fused-op name and by kind (matmuls first),
so that "what does XLA do with the step" is one table: matmul share, transposes, element-wise.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys


def summarize(trace_dir: str, steps: int = 1, top: int = 25) -> dict:
  from jax._src.lib import _profile_data  # the reader behind jax.profiler.ProfileData
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not files:
    raise SystemExit(f"profile_summary.py: error: no *.xplane.pb under {trace_dir}")
  data = _profile_data.ProfileData.from_file(files[-1])
  by_op = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not any(k in line.name for k in ("Eigen", "XLA Ops", "TPU", "Stream")):
        continue
      for ev in line.events:
        if ev.name.startswith(("ThunkExecutor", "Slinky", "$")):
          continue
        by_op[ev.name] += ev.duration_ns
  total = sum(by_op.values()) or 1
  kinds = collections.Counter()
  for name, ns in by_op.items():
    kind = re.sub(r"[._]\d+$", "", name)
    if kind.startswith(("ynn_fusion", "dot", "convolution", "onednn")):
      kind = "matmul (" + kind + ")"
    kinds[kind] += ns
  print(f"{files[-1]}: {total / steps / 1e6:.1f} ms of op time per step (all compute threads)")
  for kind, ns in kinds.most_common(top):
    print(f"  {100 * ns / total:5.1f}%  {kind}")
  return dict(total_ns=total, kinds=dict(kinds), ops=dict(by_op.most_common(200)))


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench/profile_summary.py")
  p.add_argument("trace_dir")
  p.add_argument("--steps", type=int, default=1, help="steps in the trace (per-step figures)")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  summarize(args.trace_dir, args.steps, args.top)


if __name__ == "__main__":
  sys.exit(main())
