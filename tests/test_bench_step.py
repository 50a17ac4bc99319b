"""bench/step.py end to end on the tiny config: our step and a PyTorch worker, interleaved."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.skipif(importlib.util.find_spec("torch") is None
                    or importlib.util.find_spec("transformers") is None,
                    reason="needs torch and transformers (the baseline)")
def test_step_bench_runs_ours_and_a_torch_worker(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run([sys.executable, "bench/step.py", "--configs", "tiny", "--reps", "2",
                      "--warmup", "1", "--baseline", "gathered", "--torch_malloc", "retain",
                      "--matmul_n", "1024", "--results_dir", str(tmp_path), "--tag", "t"],
                     capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads((tmp_path / "step_t.json").read_text())
  assert (tmp_path / "step_t.png").stat().st_size > 0
  res = out["results"][0]
  assert out["host_malloc_applied"] is True  # auto on a CPU-only machine
  assert set(res["times_s"]) == {"ours", "xla_matmul", "torch_gathered/retain", "torch_matmul"}
  for k in ("ours", "torch_gathered/retain"):
    assert len(res["times_s"][k]) == 2 and all(t > 0 for t in res["times_s"][k])
    # the synthetic batch is full length: real tokens = the [2B, L] grid, no padding
    assert res[k]["real_tokens_per_s"] == pytest.approx(32 * 64 / res[k]["step_s"])
    assert res[k]["padding_fraction"] == 0.0
    # MFU against the best matmul rate measured (or the step's own, if it beat it): <= 1
    assert 0.0 < res[k]["mfu_vs_best_matmul"] <= res[k]["mfu"] <= 1.0
  assert len(res["peak_matmul_samples_xla"]) == 3 * 2 * (2 + 1)  # sizes x 2, every rep + warmup
  assert res["ratio_vs_torch_gathered/retain"] == pytest.approx(
      res["median_s"]["torch_gathered/retain"] / res["median_s"]["ours"])
  assert "ours/this" in r.stdout


def test_step_bench_pairs_and_dtype_set_the_batch_and_the_matmul_peak(tmp_path):
  """--pairs replaces the config's 16 pairs (real tokens follow), and the matmul peak is timed
  in the model's dtype (bf16 on an accelerator's matrix units), both recorded in the JSON."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run([sys.executable, "bench/step.py", "--configs", "tiny", "--reps", "1",
                      "--warmup", "0", "--baseline", "none", "--pairs", "4", "--matmul_n", "256",
                      "--model.dtype=bfloat16", "--results_dir", str(tmp_path), "--tag", "p"],
                     capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads((tmp_path / "step_p.json").read_text())
  res = out["results"][0]
  assert res["pairs"] == 4 and res["matmul_dtype"] == "bfloat16"
  assert res["real_tokens_per_step"] == 2 * 4 * 64
  assert out["machine"]["device_kind"] == "cpu"
  assert "XLA bfloat16 matmul peak" in r.stdout
