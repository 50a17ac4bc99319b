"""Analytic step time and MFU of a BEPA run on a TPU slice, to size a pod run before buying it.

  python bench/pod_estimate.py                                   # base, B = 4096 pairs, L = 128
  python bench/pod_estimate.py --pairs 16384 --seq 256 --vocab 250002 --mfu 0.4

Compute: bench/harness.train_flops (every matmul, forward + backward) spread over the chips at
an assumed fraction `--mfu` of the published bf16 peak. Communication (data parallel, ring
algorithms, per-chip bandwidth = the published all-reduce bandwidth per Pod / chips per Pod):
  gradient all-reduce    2 (N-1)/N * 4 bytes * params              (fp32 gradients)
  [CLS] all-gather       2 sides * (N-1)/N * B * D * 4 bytes       forward
  its reduce-scatter     the same again                             backward
Reported as not overlapped (upper bound) and as overlapped with the backward (max of the two).
Writes bench/results/pod_estimate.json.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

# Published figures (cloud.google.com/tpu/docs/v4, /v5e): bf16 peak per chip, HBM per chip,
# all-reduce bandwidth per Pod and chips per Pod. v4-32 = 16 chips (v4 names count TensorCores,
# 2 per chip, one JAX device per chip), v5e-64 = 64 chips.
SLICES = {
    "v4-32": dict(chips=16, peak=275e12, hbm_gib=32, allreduce_pod=1.1e15, pod_chips=4096),
    "v5e-64": dict(chips=64, peak=197e12, hbm_gib=16, allreduce_pod=51.2e12, pod_chips=256),
    "v5e-256": dict(chips=256, peak=197e12, hbm_gib=16, allreduce_pod=51.2e12, pod_chips=256),
    # v5p (cloud.google.com/tpu/docs/v5p): 459 TFLOP/s, 95 GiB, ICI 4800 Gbps = 600 GB/s per chip
    "v5p-128": dict(chips=64, peak=459e12, hbm_gib=95, allreduce_pod=600e9 * 8960, pod_chips=8960),
}


def estimate(slice_name: str, config, mfu: float) -> dict:
  s = SLICES[slice_name]
  N = s["chips"]
  fl = harness.train_flops(config)
  m = config.model
  h, V, I, nl = m.hidden_size, m.vocab_size, m.intermediate_size, m.num_layers
  params = (V * h + m.max_position_embeddings * h + 2 * h + 2 * h
            + nl * (4 * h * h + 4 * h + 2 * h * I + I + h + 4 * h)
            + h * h + h + 2 * h + V)
  B = config.train.global_batch
  bw = s["allreduce_pod"] / s["pod_chips"]            # bytes/s per chip for ring collectives
  t_compute = fl["step"] / (N * s["peak"] * mfu)
  t_grad = 2 * (N - 1) / N * 4 * params / bw
  t_cls = 2 * 2 * (N - 1) / N * B * h * 4 / bw       # all-gather fwd + reduce-scatter bwd, 2 sides
  t_serial = t_compute + t_grad + t_cls
  t_overlap = max(t_compute, t_grad) + t_cls          # the [CLS] gather sits on the critical path
  state_bytes = params * 4 * 4                       # params, grads, Adam m and v (fp32)
  return dict(slice=slice_name, chips=N, peak_flops_per_chip=s["peak"], ici_bytes_per_s=bw,
              params=params, flops_per_step=fl["step"], assumed_mfu=mfu,
              t_compute_s=t_compute, t_grad_allreduce_s=t_grad, t_cls_allgather_s=t_cls,
              step_s_serial=t_serial, step_s_overlapped=t_overlap,
              mfu_serial=fl["step"] / (N * s["peak"] * t_serial),
              mfu_overlapped=fl["step"] / (N * s["peak"] * t_overlap),
              pairs_per_s=B / t_overlap, tokens_per_s=fl["tokens"] / t_overlap,
              state_gib_per_chip_replicated=state_bytes / 2**30, hbm_gib=s["hbm_gib"])


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench/pod_estimate.py")
  p.add_argument("--config", default="base", choices=sorted(harness.SHAPES))
  p.add_argument("--pairs", type=int, default=4096, help="global batch B (sentence pairs)")
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--vocab", type=int, default=0, help="0 = the config's (32000)")
  p.add_argument("--mfu", type=float, default=0.5, help="assumed fraction of peak for the matmuls")
  args = p.parse_args(argv)
  overrides = {"vocab_size": args.vocab} if args.vocab else {}
  config = harness.make_config(args.config, **overrides)
  config.train.global_batch = args.pairs
  config.data.max_length = args.seq
  config.data.max_predictions_per_seq = harness.n_predictions(args.seq)
  rows = [estimate(s, config, args.mfu) for s in SLICES]
  print(f"{args.config}: B={args.pairs} pairs, L={args.seq}, vocab={config.model.vocab_size}, "
        f"{rows[0]['flops_per_step'] / 1e12:.1f} TFLOP/step, {rows[0]['params'] / 1e6:.0f}M params, "
        f"assumed matmul MFU {args.mfu:.0%}")
  for r in rows:
    print(f"{r['slice']:7s} {r['chips']:3d} chips | compute {r['t_compute_s'] * 1e3:7.1f} ms | "
          f"grad all-reduce {r['t_grad_allreduce_s'] * 1e3:5.2f} ms | [CLS] gather "
          f"{r['t_cls_allgather_s'] * 1e3:5.3f} ms | step {r['step_s_overlapped'] * 1e3:7.1f} ms "
          f"(no overlap {r['step_s_serial'] * 1e3:7.1f}) | MFU {r['mfu_overlapped']:.1%} "
          f"({r['mfu_serial']:.1%}) | {r['pairs_per_s']:8.0f} pairs/s")
  print("saved", harness.save_json("pod_estimate.json", dict(args=vars(args), rows=rows)))


if __name__ == "__main__":
  main()
