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


def test_step_bench_profile_sums_the_traced_steps_by_kind(tmp_path):
  """--profile traces our steps after the timed rounds and adds their op time by kind (matmuls
  marked) to the JSON: the ops' total is the step's, not zero, and matmuls are a real share."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run([sys.executable, "bench/step.py", "--configs", "tiny", "--reps", "1",
                      "--warmup", "1", "--baseline", "none", "--matmul_n", "256",
                      "--mlm_vocab_chunk", "256", "--profile", str(tmp_path / "prof"),
                      "--profile_steps", "1", "--results_dir", str(tmp_path), "--tag", "f"],
                     capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  res = json.loads((tmp_path / "step_f.json").read_text())["results"][0]
  assert set(res["profile"]) == {"ours", "ours_mlm_chunk"}
  for k, prof in res["profile"].items():
    assert prof["file"].startswith(str(tmp_path / "prof" / f"tiny_{k}"))
    assert prof["total_ns"] > 0 and 0.2 < prof["matmul_fraction"] < 1.0
    # the op time of one traced step is of the order of the timed step (2 compute threads)
    assert 0.1 * res[k]["best_step_s"] < prof["ms_per_step"] / 1e3 < 4 * res[k]["step_s"]
    assert any(kind.startswith("matmul") for kind in prof["kinds"])
  assert "profile of ours_mlm_chunk" in r.stdout


def test_profile_summary_reads_an_accelerators_streams_not_its_op_line_twice():
  """On a GPU the kernels are on the device plane's streams and again, by HLO name, on its
  "XLA Ops" line: only the streams count, so no op is summed twice; cuBLAS kernels are matmuls."""
  import types
  sys.path.insert(0, os.path.join(REPO, "bench"))
  import profile_summary

  def line(name, *events):
    return types.SimpleNamespace(name=name, events=[types.SimpleNamespace(name=e, duration_ns=1)
                                                    for e in events])
  gpu = types.SimpleNamespace(name="/device:GPU:0", lines=[
      line("XLA Ops", "fusion.1", "custom-call.2"), line("Stream #13(Compute)", "loop_fusion"),
      line("Stream #14(MemcpyD2D)", "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN")])
  host = types.SimpleNamespace(name="/host:CPU", lines=[line("XLA Ops", "dot.3")])
  lines = profile_summary.op_lines(types.SimpleNamespace(planes=[host, gpu]))
  assert [ln.name for ln in lines] == ["Stream #13(Compute)", "Stream #14(MemcpyD2D)"]
  assert profile_summary.kind_of("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN").startswith("matmul")
  assert profile_summary.kind_of("loop_add_fusion_3") == "loop_add_fusion"
  assert profile_summary.op_lines(types.SimpleNamespace(planes=[host]))[0].name == "XLA Ops"
