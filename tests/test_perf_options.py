"""Speed / memory options change nothing numerically; the profiler writes a trace."""
import glob
import os

import dataclasses

import jax
import numpy as np
import pytest

from bepa_jax.trainer import build as build_lib
from bepa_jax.trainer import loop
from bepa_jax.model import BepaEncoder, EncoderConfig
from tests.helpers import devices, tiny_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("perf"))  # shared: the tokenizer is trained once


def _one_step(config, workdir, n_devices=2):
  job = build_lib.build(config, workdir, devices(n_devices))
  batch = loop.global_batch(job.pipeline.batch(0), job.mesh)
  with jax.set_mesh(job.mesh):
    state, metrics = job.step_fn(job.state, batch)
  return jax.device_get(state.params), {k: float(v) for k, v in jax.device_get(metrics).items()}


@pytest.fixture(scope="module")
def reference(workdir):
  return _one_step(tiny_config(**EPS), workdir)


# Parameters after one AdamW step. Adam's first update is lr * g / (|g| + eps): with the usual
# eps = 1e-6 it is ~lr * sign(g), so a gradient that is a near-cancelling sum (~1e-7) flips with
# summation order. eps = 1e-2 makes the update linear in g, so parameters compare gradients.
EPS = {"optim.eps": 1e-2}
def test_chunked_infonce_step_matches_default_step(workdir, reference):
  ref_params, ref = reference
  params, got = _one_step(tiny_config(**EPS, **{"loss.contrastive_chunk": 4}), workdir)
  for k in ("loss", "mlm_loss", "contrastive_loss", "grad_norm", "pos_cos", "neg_cos"):
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, err_msg=k)
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_profile_steps_write_a_trace(tmp_path):
  cfg = tiny_config(**{"train.steps": 4, "train.profile_start": 2, "train.profile_steps": 1,
                       "checkpoint.every_steps": 0, "checkpoint.every_minutes": 0.0})
  loop.train(cfg, str(tmp_path))
  traces = glob.glob(os.path.join(str(tmp_path), "profile", "**", "*.xplane.pb"), recursive=True)
  assert traces and os.path.getsize(traces[0]) > 0


def test_fused_qkv_same_parameters_same_outputs():
  cfg = EncoderConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position_embeddings=16)
  fused = dataclasses.replace(cfg, fused_qkv=True)
  ids = np.random.default_rng(0).integers(5, 100, (3, 16)).astype(np.int32)
  pos = np.tile(np.arange(1, 4, dtype=np.int32), (3, 1))
  v0 = BepaEncoder(cfg).init(jax.random.key(0), ids, mlm_positions=pos)
  v1 = BepaEncoder(fused).init(jax.random.key(0), ids, mlm_positions=pos)
  assert jax.tree_util.tree_structure(v0) == jax.tree_util.tree_structure(v1)  # names, nesting
  for a, b in zip(jax.tree.leaves(v0), jax.tree.leaves(v1)):
    np.testing.assert_array_equal(a, b)  # shapes and init: HF conversion is unaffected

  def loss(model, v):
    out = model.apply(v, ids, mlm_positions=pos)
    return out["mlm_logits"].mean() + out["cls"].sum()
  l0, g0 = jax.value_and_grad(lambda v: loss(BepaEncoder(cfg), v))(v0)
  l1, g1 = jax.value_and_grad(lambda v: loss(BepaEncoder(fused), v))(v0)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
