"""The sharded train step equals the single-device step; lambda=0 is pure MLM."""
import jax
import numpy as np
import pytest

from bepa_jax.trainer import build as build_lib
from bepa_jax.trainer import loop
from tests.helpers import assert_params_close, devices, tiny_config

# fp32 on CPU. Sharding changes the order of floating-point sums (all-reduces), so results
# agree to rounding, not bitwise: loss and metrics to rtol 1e-5. Parameters after one AdamW
# step (lr 1e-3): all but 0.1% of elements within 1e-6 and every element within 2e-4. Adam's
# first update is lr * g / (|g| + eps): for the few gradients of size ~eps (1e-6) -- e.g. the
# [CLS] position embedding, whose LayerNorm input is the same vector in every sequence -- a
# rounding-level change in g moves the update by a fraction of lr (see helpers.assert_params_close).
# A real disagreement (wrong shard, wrong labels) moves most elements by ~lr.
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("step"))  # shared: the tokenizer is trained once


def _one_step(config, workdir, n_devices):
  job = build_lib.build(config, workdir, devices(n_devices))
  batch = loop.global_batch(job.pipeline.batch(0), job.mesh)
  with jax.set_mesh(job.mesh):
    state, metrics = job.step_fn(job.state, batch)
  return jax.device_get(state.params), {k: float(v) for k, v in jax.device_get(metrics).items()}


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_step_matches_one_device(workdir, mesh):
  ref_params, ref_metrics = _one_step(tiny_config(**{"mesh.data": 1}), workdir, 1)
  cfg = tiny_config(**{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
  params, metrics = _one_step(cfg, workdir, 8)
  assert ref_metrics["contrastive_loss"] > 1.0 and ref_metrics["mlm_loss"] > 1.0
  for k in ("loss", "mlm_loss", "contrastive_loss", "acc_x2y", "pos_cos", "neg_cos", "grad_norm"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=LOSS_RTOL, err_msg=k)
  assert_params_close(params, ref_params)


def test_lambda_zero_is_pure_mlm(workdir):
  """With weight 0 the loss is the MLM loss and the update ignores the contrastive term."""
  params0, m0 = _one_step(tiny_config(**{"loss.weight": 0.0}), workdir, 8)
  assert m0["loss"] == pytest.approx(m0["mlm_loss"], rel=1e-7)
  assert m0["contrastive_loss"] > 0  # still measured and logged
  # Changing the temperature changes nothing in a pure-MLM update.
  params1, m1 = _one_step(tiny_config(**{"loss.weight": 0.0, "loss.temperature": 0.5}), workdir, 8)
  assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-7)
  for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(params1)):
    np.testing.assert_array_equal(a, b)
  # ...whereas with lambda=1 it does.
  params2, m2 = _one_step(tiny_config(**{"loss.weight": 1.0}), workdir, 8)
  assert m2["loss"] > m2["mlm_loss"] + 1.0
  diffs = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(params2))]
  assert max(diffs) > 1e-5


def test_grad_accumulation_matches_mean_of_microbatch_grads(workdir):
  """k micro-batches: the mean of k independent steps' losses (each its own negative pool)."""
  cfg = tiny_config(**{"train.grad_accum_steps": 2})
  params, metrics = _one_step(cfg, workdir, 8)
  assert np.isfinite(metrics["loss"]) and metrics["contrastive_loss"] > 0
  # Micro-batch pool is B/k: the contrastive loss is near log(B/k) at init, not log(B).
  assert metrics["contrastive_loss"] < np.log(16) - 0.2


def test_dropout_rng_changes_only_the_dropout_draws(workdir):
  """train.dropout_rng=rbg: the same init, other dropout masks, deterministic (resume and
  GradCache's re-run depend on it); without dropout the step is the same."""
  drop = {"model.hidden_dropout": 0.1, "model.attention_dropout": 0.1}
  job_t = build_lib.build(tiny_config(**drop), workdir, devices(8))
  job_r = build_lib.build(tiny_config(**drop, **{"train.dropout_rng": "rbg"}), workdir, devices(8))
  for a, b in zip(jax.tree.leaves(job_t.state.params), jax.tree.leaves(job_r.state.params)):
    np.testing.assert_array_equal(a, b)  # init is threefry either way
  _, m_t = _one_step(tiny_config(**drop), workdir, 8)
  _, m_r = _one_step(tiny_config(**drop, **{"train.dropout_rng": "rbg"}), workdir, 8)
  _, m_r2 = _one_step(tiny_config(**drop, **{"train.dropout_rng": "rbg"}), workdir, 8)
  assert m_r["loss"] == m_r2["loss"] and m_r["loss"] != m_t["loss"]
  _, n_t = _one_step(tiny_config(), workdir, 8)
  _, n_r = _one_step(tiny_config(**{"train.dropout_rng": "rbg"}), workdir, 8)
  assert n_r["loss"] == pytest.approx(n_t["loss"], rel=1e-7)


def test_unknown_dropout_rng_is_a_config_error(workdir):
  from bepa_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="train.dropout_rng='philox'.*threefry2x32, rbg"):
    build_lib.build(tiny_config(**{"train.dropout_rng": "philox"}), workdir, devices(8))
