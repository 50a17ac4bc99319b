"""bench/grad_reduce_dtype.py: XLA:TPU sums a bf16 matmul's weight gradient over the batch
shards in bf16 unless the weight-gradient dot returns fp32 (docs/pods.md states it)."""
import os
import sys

import jax

from tests.aot_common import needs_libtpu
from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
import grad_reduce_dtype as probe  # noqa: E402


@needs_libtpu
def test_tpu_reduces_in_bf16_unless_the_weight_gradient_dot_returns_fp32():
  from bepa_jax import tpu_specs
  from bepa_jax.aot import libtpu
  tpu = libtpu.topology_devices(tpu_specs.parse("v5e-8"), 1)
  n, d, f = 512, 128, 256
  assert probe.reductions(tpu, "today", n, d, f) == ["bf16[128,256]"]
  assert probe.reductions(tpu, "f32 out", n, d, f) == ["bf16[128,256]"]
  assert probe.reductions(tpu, "f32 grad", n, d, f) == ["f32[128,256]"]


def test_cpu_promotes_and_the_fp32_form_removes_the_per_shard_rounding():
  cpu = jax.devices("cpu")[:8]
  for form in probe.FORMS:
    assert [r.split("[")[0] for r in probe.reductions(cpu, form, 512, 128, 256)] == ["f32"]
  today, fp32 = (probe.cpu_error(form, 512, 128, 256) for form in ("today", "f32 grad"))
  assert fp32 < 1e-5 < today < 2e-2


def test_stored_pod_compiles_sum_in_fp32_with_the_option_and_today_equals_the_table():
  """bench/results/weight_grads_fp32.json, re-read from its compiles: with
  model.weight_grads_fp32 every weight-gradient sum over the batch chips is fp32 (bf16 without),
  and the default step compiled on today's model code is the pod table's, to the microsecond."""
  import json
  import weight_grads_fp32 as bench
  res = os.path.join(REPO, "bench", "results")
  stored = json.load(open(os.path.join(res, "weight_grads_fp32.json")))
  table = json.load(open(os.path.join(res, "aot_table.json")))
  assert len(stored["cells"]) == 3
  for row in stored["cells"]:
    for tag in ("today", "fp32"):
      report = json.load(open(os.path.join(res, "weight_grads_fp32", f"{row['cell']}_{tag}.json")))
      assert bench.summary(report) == row[tag]
    assert set(row["fp32"]["weight_grad_sums"]) == {"f32"}
    assert row["today"]["weight_grad_sums"].get("bf16", 0) > 0
    _, best = bench.best_plan(table, row["cell"])
    assert abs(row["today"]["step_ms"] - best["step_ms"]) < 1e-3
    assert 1.0 < row["step_ratio"] < 1.2
