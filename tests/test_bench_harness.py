"""bench/harness.py's MFU denominator on fake timings: a stalled peak measurement can never
make an MFU above 100% printable."""
import os
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import harness  # noqa: E402


def test_peak_is_the_best_sample_not_a_stalled_one():
  gflop = 1e9
  samples = [(8 * gflop, 0.2), (8 * gflop, 0.04), (gflop, 0.5), (gflop, 0.0)]  # 40 .. 200
  assert harness.peak_rate(samples) == pytest.approx(200e9)


def test_a_step_faster_than_the_measured_peak_makes_the_peak_a_lower_bound():
  # The base-config case: the matmul was measured at 38 GFLOP/s while the step's model FLOPs
  # ran at 91.6 GFLOP/s (the printed MFU was 241%).
  flops, times = 1832e9, [21.0, 20.0, 22.5]
  achieved = {"ours": flops / min(times), "torch_hf/system": flops / 30.0}
  p = harness.mfu_peak(38e9, achieved)
  assert not p["reliable"] and p["bound_by"] == "ours"
  assert p["peak"] == pytest.approx(flops / 20.0) and p["measured"] == 38e9
  assert "unreliable" in p["note"] and "lower bound" in p["note"]
  mfu = flops / harness.median(times) / p["peak"]
  assert mfu == pytest.approx(20.0 / 21.0) and mfu <= 1.0


def test_a_sound_peak_is_kept():
  p = harness.mfu_peak(190e9, {"ours": 120e9, "torch_hf/system": 60e9})
  assert p["reliable"] and p["peak"] == 190e9 and p["note"] == "" and p["bound_by"] is None


def test_matmul_peak_samples_every_size_each_call():
  peak = harness.MatmulPeak(sizes=(32, 64), reps=2)
  peak()
  peak()
  assert [f for f, _ in peak.samples] == [2 * 32 ** 3] * 2 + [2 * 64 ** 3] * 2 + \
      [2 * 32 ** 3] * 2 + [2 * 64 ** 3] * 2
  assert peak.best == max(f / s for f, s in peak.samples) > 0
