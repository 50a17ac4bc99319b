"""model.weight_grads_fp32: under bf16 compute each weight's gradient leaves its matmul in fp32,
so XLA:TPU sums it over the batch shards in fp32 (bf16 otherwise: bench/grad_reduce_dtype.py).
The forward and the activations' gradients are today's; only the weight gradients gain bits."""
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bepa_jax import model as model_lib
from bepa_jax import tpu_specs
from bepa_jax.aot import compile as aot
from bepa_jax.objective.mlm import chunked_mlm_loss
from tests.aot_common import needs_libtpu, tiny
from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "bench"))
from weight_grads_fp32 import weight_grad_sums  # noqa: E402  (the pod compiles' own filter)

BF16 = model_lib.EncoderConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4,
                               intermediate_size=64, max_position_embeddings=16,
                               dtype="bfloat16", hidden_dropout=0.0, attention_dropout=0.0)
FP32_GRADS = dataclasses.replace(BF16, weight_grads_fp32=True)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("x_shape, w_shape, n_in, front", [
    ((6, 5, 32), (32, 4, 8), 1, True),     # [H] -> [heads, kv] (query, key, value)
    ((6, 5, 4, 8), (4, 8, 32), 2, True),   # [heads, kv] -> [H] (attention output)
    ((6, 5, 32), (32, 3, 4, 8), 1, True),  # fused QKV
    ((6, 32), (96, 32), 1, False),         # h @ embedding.T (the tied decoder)
])
def test_weight_dot_same_forward_and_input_gradient_fp32_weight_gradient(x_shape, w_shape, n_in,
                                                                         front):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape, jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(kw, w_shape, jnp.float32)
  dot = lambda cfg: lambda x_, w_: model_lib.weight_dot(cfg, x_, w_, n_in, front)
  y0, vjp0 = jax.vjp(dot(BF16), x, w)
  y1, vjp1 = jax.vjp(dot(FP32_GRADS), x, w)
  np.testing.assert_array_equal(np.asarray(y1, np.float32), np.asarray(y0, np.float32))
  g = jax.random.normal(kg, y0.shape, jnp.float32).astype(jnp.bfloat16)
  (gx0, gw0), (gx1, gw1) = vjp0(g), vjp1(g)
  assert gx1.dtype == gx0.dtype == jnp.bfloat16 and gw1.dtype == gw0.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(gx1, np.float32), np.asarray(gx0, np.float32),
                             rtol=1e-2, atol=1e-2)
  # the reference: the same bf16 x and g, multiplied and summed in fp32 (linear in w)
  ref = jax.vjp(lambda w_: model_lib._dot(x.astype(jnp.float32), w_, n_in, front),
                w)[1](g.astype(jnp.float32))[0]
  assert _rel(gw1, ref) < 1e-5 < _rel(gw0, ref)


def _batch():
  ids = jax.random.randint(jax.random.key(1), (4, 12), 3, 96)
  return dict(input_ids=ids, token_type_ids=jnp.zeros_like(ids),
              attention_mask=jnp.ones_like(ids), mlm_positions=jnp.array([[1, 4]] * 4))


@pytest.mark.parametrize("chunked", [False, True])
def test_encoder_same_outputs_same_parameters_close_fp32_gradients(chunked):
  batch = _batch()
  params = model_lib.BepaEncoder(BF16).init(jax.random.key(0), **batch)["params"]
  labels = jnp.arange(8).reshape(4, 2) + 5

  def loss(cfg, p):
    out = model_lib.BepaEncoder(cfg).apply({"params": p}, **batch, mlm_decode=not chunked)
    if chunked:
      emb, bias = out["mlm_decoder"]
      ce = chunked_mlm_loss(out["mlm_hidden"], emb, bias, labels, jnp.ones((4, 2)), 40)[0]
    else:
      ce = jnp.take_along_axis(jax.nn.log_softmax(out["mlm_logits"]), labels[..., None], -1).sum()
    return ce + jnp.sum(out["cls"] ** 2), out

  (l0, out0), g0 = jax.value_and_grad(lambda p: loss(BF16, p), has_aux=True)(params)
  (l1, out1), g1 = jax.value_and_grad(lambda p: loss(FP32_GRADS, p), has_aux=True)(params)
  assert float(l1) == float(l0)
  np.testing.assert_array_equal(out1["cls"], out0["cls"])
  assert jax.tree.structure(g1) == jax.tree.structure(g0)
  # bf16 rounding apart, the same gradients; a gradient that is ~0 (the key bias: softmax does
  # not see it) is rounding noise in both, so each leaf is read against 1e-3 of the largest
  scale = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(g0))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
    assert a.dtype == b.dtype == jnp.float32, path
    err = float(jnp.abs(a - b).max()) / max(float(jnp.abs(b).max()), 1e-3 * scale)
    assert err < 0.05, (jax.tree_util.keystr(path), err)


@needs_libtpu
def test_tpu_sums_the_weight_gradients_in_fp32():
  topo = tpu_specs.parse("v5e-8")
  common = ("--config.model.dtype=bfloat16", "--config.data.packing=False")
  sums = lambda *extra: weight_grad_sums(aot.compile_step(tiny(*common, *extra), topo,
                                                         tokens_per_sentence=6))
  bf16, fp32 = sums(), sums("--config.model.weight_grads_fp32=True")
  assert bf16.get("bf16", 0) > 0, bf16
  assert set(fp32) == {"f32"}, fp32


def test_sharded_train_step_same_loss_close_update(tmp_path):
  """The jitted step on 8 devices (data 4 x fsdp 2, scanned layers, chunked MLM): the first
  loss is today's exactly, and two updates later the parameters agree to bf16's rounding."""
  from bepa_jax.trainer import build as build_lib
  from bepa_jax.trainer import loop
  from tests.helpers import devices, tiny_config

  def two_steps(on):
    cfg = tiny_config(**{"mesh.data": 4, "mesh.fsdp": 2, "model.dtype": "bfloat16",
                         "model.scan_layers": True, "loss.mlm_vocab_chunk": 128,
                         "model.weight_grads_fp32": on})
    job = build_lib.build(cfg, str(tmp_path), devices(8))
    state, losses = job.state, []
    with jax.set_mesh(job.mesh):
      for step in range(2):
        state, m = job.step_fn(state, loop.global_batch(job.pipeline.batch(step), job.mesh))
        losses.append(float(m["loss"]))
    return jax.device_get(state.params), losses

  (p1, l1), (p0, l0) = two_steps(True), two_steps(False)
  assert l1[0] == l0[0] and abs(l1[1] - l0[1]) < 1e-2 * abs(l0[1])
  diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(p1),
                                                               jax.tree.leaves(p0))])
  # Adam moves a parameter by at most ~lr a step, so 2 steps differ by <= 4e-3 (a ~0 gradient
  # whose sign the rounding flips); nearly all differ by far less
  assert diff.max() <= 4e-3 and np.quantile(diff, 0.99) < 1e-4, (diff.max(), np.quantile(diff, 0.99))


def test_one_device_step_runs_on_cpu_with_todays_loss(tmp_path):
  """XLA:CPU's runtime lacks a bf16 x bf16 -> f32 dot for the tied decoder's gradient on one
  device (UNIMPLEMENTED in DotThunk): the CPU form casts up first (model._fp32_sum_dot)."""
  from bepa_jax.trainer import build as build_lib
  from bepa_jax.trainer import loop
  from tests.helpers import tiny_config

  def first_loss(on):
    cfg = tiny_config(**{"model.dtype": "bfloat16", "model.weight_grads_fp32": on})
    job = build_lib.build(cfg, str(tmp_path), jax.devices()[:1])
    with jax.set_mesh(job.mesh):
      _, m = job.step_fn(job.state, loop.global_batch(job.pipeline.batch(0), job.mesh))
      return float(m["loss"]), float(m["grad_norm"])

  (l1, n1), (l0, n0) = first_loss(True), first_loss(False)
  assert l1 == l0 and abs(n1 - n0) < 1e-2 * n0
