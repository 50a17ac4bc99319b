"""Where a profiled step spends its time: op durations summed from a jax.profiler trace.

  bepa-train ... --config.train.profile_start=3 --config.train.profile_steps=2 --workdir W
  python bench/profile_summary.py W/profile --steps 2

Sums the XLA ops' events by fused-op name and by kind, so that "what does XLA do with the step"
is one table: matmul share, transposes, element-wise. On CPU the ops are on XLA's compute
threads; on a GPU they are the kernels on the device's streams (bench/step.py --profile).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys


MATMUL = re.compile(r"^(ynn_fusion|dot|convolution|onednn)|gemm|cublas|nvjet|xmma|cutlass",
                    re.IGNORECASE)


def op_lines(data):
  """The timelines that hold the step's ops, each op once: an accelerator's kernel streams
  ("Stream #N") when the trace has a /device:GPU or /device:TPU plane (its "XLA Ops" line
  repeats them under HLO names), else the host's compute threads (XLA:CPU)."""
  devices = [p for p in data.planes if re.match(r"/device:(GPU|TPU):", p.name)]
  if devices:
    lines = [ln for p in devices for ln in p.lines if ln.name.startswith("Stream")]
    return lines or [ln for p in devices for ln in p.lines if ln.name == "XLA Ops"]
  return [ln for p in data.planes for ln in p.lines
          if any(k in ln.name for k in ("Eigen", "XLA Ops", "TPU", "Stream"))]


def kind_of(name: str) -> str:
  """An op's or kernel's kind: its name without the trailing number; matmuls marked."""
  kind = re.sub(r"[._]\d+$", "", name)
  return "matmul (" + kind + ")" if MATMUL.search(kind) else kind


def summarize(trace_dir: str, steps: int = 1, top: int = 25, quiet: bool = False) -> dict:
  from jax._src.lib import _profile_data  # the reader behind jax.profiler.ProfileData
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
  if not files:
    raise SystemExit(f"profile_summary.py: error: no *.xplane.pb under {trace_dir}")
  data = _profile_data.ProfileData.from_file(files[-1])
  by_op = collections.Counter()
  for line in op_lines(data):
    for ev in line.events:
      if ev.name.startswith(("ThunkExecutor", "Slinky", "$")):
        continue
      by_op[ev.name] += ev.duration_ns
  total = sum(by_op.values()) or 1
  kinds = collections.Counter()
  for name, ns in by_op.items():
    kinds[kind_of(name)] += ns
  matmul = sum(ns for k, ns in kinds.items() if k.startswith("matmul"))
  if not quiet:
    print(f"{files[-1]}: {total / steps / 1e6:.1f} ms of op time per step "
          f"({100 * matmul / total:.0f}% matmul)")
    for kind, ns in kinds.most_common(top):
      print(f"  {100 * ns / total:5.1f}%  {kind}")
  return dict(file=files[-1], total_ns=total, ms_per_step=total / steps / 1e6,
              matmul_fraction=matmul / total, kinds=dict(kinds.most_common(top)),
              ops=dict(by_op.most_common(200)))


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench/profile_summary.py")
  p.add_argument("trace_dir")
  p.add_argument("--steps", type=int, default=1, help="steps in the trace (per-step figures)")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  summarize(args.trace_dir, args.steps, args.top)


if __name__ == "__main__":
  sys.exit(main())
