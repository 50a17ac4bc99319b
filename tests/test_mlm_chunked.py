"""The MLM cross-entropy streamed over vocabulary chunks (loss.mlm_vocab_chunk) equals the dense
form: loss, accuracy and the gradients of h, E and the bias, alone, through the model and in a
sharded train step; and no [positions, V] buffer is compiled."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bepa_jax.errors import ConfigError
from bepa_jax.model import BepaEncoder, EncoderConfig
from bepa_jax.objective import mlm
from bepa_jax.trainer import build as build_lib
from bepa_jax.trainer import loop
from tests.helpers import assert_params_close, devices, tiny_config

# (family, V, pad id): bert's small vocabulary, and an XLM-R-like one (pad id 1).
FAMILIES = {"bert": (400, 0), "xlmr": (2003, 1)}


def _inputs(V, pad, N=40, H=16, seed=0):
  """h, E, bias, labels, weights; the unweighted positions carry the pad id, as the data does."""
  k = jax.random.split(jax.random.key(seed), 4)
  h = jax.random.normal(k[0], (N, H))
  E = jax.random.normal(k[1], (V, H)) * 0.5
  bias = jax.random.normal(k[2], (V,)) * 0.2
  weights = (jnp.arange(N) % 4 != 3).astype(jnp.float32)
  labels = jnp.where(weights > 0, jax.random.randint(k[3], (N,), 2, V), pad)
  # a few rows whose label is the argmax, so that accuracy is not 0
  top = jnp.argmax(h @ E.T + bias, axis=-1)
  labels = labels.at[:6].set(top[:6])
  return h, E, bias, labels, weights


def _dense(h, E, bias, labels, weights):
  return mlm.mlm_loss(h @ E.T + bias, labels, weights)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("chunk", [1, 64, 100, 4096])  # 1 row, a tail, V % chunk == 0 (bert), > V
def test_chunked_equals_dense_values_and_gradients(family, chunk):
  V, pad = FAMILIES[family]
  h, E, bias, labels, weights = _inputs(V, pad)
  chunked = lambda h, E, b, lab, w: mlm.chunked_mlm_loss(h, E, b, lab, w, chunk)
  out = {}
  for name, fn in (("dense", _dense), ("chunked", chunked)):
    f = lambda h, E, b, fn=fn: (lambda r: (r[0], r[1:]))(fn(h, E, b, labels, weights))
    (ce, (correct, count)), g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(
        h, E, bias)
    out[name] = (float(ce), float(correct), float(count), g)
  (ce_d, c_d, n_d, g_d), (ce_c, c_c, n_c, g_c) = out["dense"], out["chunked"]
  np.testing.assert_allclose(ce_c, ce_d, rtol=1e-6)
  assert (c_c, n_c) == (c_d, n_d) and c_d >= 5 and n_d == 30
  for name, a, b in zip(("h", "E", "bias"), g_c, g_d):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_leading_shape_and_bfloat16():
  """[N, P, H] inputs flatten like [N, P] labels; bfloat16 h follows the dense bf16 decoder."""
  h, E, bias, labels, weights = _inputs(*FAMILIES["xlmr"])
  shaped = lambda a: a.reshape((8, 5) + a.shape[1:])
  got = mlm.chunked_mlm_loss(shaped(h), E, bias, shaped(labels), shaped(weights), 300)
  want = _dense(h, E, bias, labels, weights)
  np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6)
  hb = h.astype(jnp.bfloat16)
  dense_bf16 = mlm.mlm_loss((hb @ E.astype(jnp.bfloat16).T).astype(jnp.float32) + bias, labels,
                            weights)
  got = mlm.chunked_mlm_loss(hb, E, bias, labels, weights, 300)
  np.testing.assert_allclose(float(got[0]), float(dense_bf16[0]), rtol=2e-2)
  g = jax.grad(lambda h: mlm.chunked_mlm_loss(h, E, bias, labels, weights, 300)[0])(hb)
  assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def _vocab_dims(hlo, vocab_sizes):
  """Shapes of the f32 arrays in `hlo` with a dimension among `vocab_sizes` (V, or a shard)."""
  shapes = set()
  for dims in re.findall(r"f32\[([\d,]+)\]", hlo):
    d = tuple(int(x) for x in dims.split(","))
    if set(d) & set(vocab_sizes):
      shapes.add(d)
  return shapes


def _by_vocab(hlo, vocab_sizes, hidden_sizes):
  """The arrays that are vocabulary x something other than hidden: [positions, V] and the like
  (E [V, H], its gradient and the bias, or their shards, are not)."""
  return {d for d in _vocab_dims(hlo, vocab_sizes)
          if set(d) - set(vocab_sizes) - set(hidden_sizes)}


def test_no_positions_by_vocab_buffer_in_the_compiled_gradient():
  V, N, H = 1000, 64, 16
  h, E, bias, labels, weights = _inputs(V, 0, N=N, H=H)
  def compiled(fn):
    f = jax.jit(jax.value_and_grad(lambda h, E, b: fn(h, E, b)[0], argnums=(0, 1, 2)))
    return f.lower(h, E, bias).compile().as_text()
  dense = compiled(lambda h, E, b: _dense(h, E, b, labels, weights))
  chunked = compiled(lambda h, E, b: mlm.chunked_mlm_loss(h, E, b, labels, weights, 128))
  assert (N, V) in _by_vocab(dense, {V}, {H})
  assert _vocab_dims(chunked, {V}) <= {(V,), (V, H)}, _vocab_dims(chunked, {V})


def test_model_hidden_output_keeps_the_parameters_and_equals_the_logits():
  cfg = EncoderConfig(vocab_size=300, family="xlmr", hidden_size=32, num_layers=1, num_heads=4,
                      intermediate_size=64, max_position_embeddings=40, type_vocab_size=1,
                      pad_token_id=1, layer_norm_eps=1e-5)
  model = BepaEncoder(cfg)
  ids = jax.random.randint(jax.random.key(1), (4, 12), 2, 300)
  pos = jnp.tile(jnp.array([[1, 3, 5]]), (4, 1))
  params = model.init(jax.random.key(0), ids, None, None, pos)["params"]
  hidden_tree = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, None, None, pos,
                                                  mlm_decode=False))["params"]
  assert jax.tree.structure(hidden_tree) == jax.tree.structure(params)
  out = model.apply({"params": params}, ids, None, None, pos)
  hid = model.apply({"params": params}, ids, None, None, pos, mlm_decode=False)
  assert "mlm_logits" not in hid and hid["mlm_hidden"].shape == (4, 3, 32)
  E, bias = hid["mlm_decoder"]
  np.testing.assert_allclose(hid["mlm_hidden"] @ E.T + bias, out["mlm_logits"], rtol=1e-5,
                             atol=1e-5)
  labels = jax.random.randint(jax.random.key(2), (4, 3), 2, 300)
  w = jnp.ones((4, 3))
  def loss(p, chunk):
    if not chunk:
      return mlm.mlm_loss(model.apply({"params": p}, ids, None, None, pos)["mlm_logits"],
                          labels, w)[0]
    o = model.apply({"params": p}, ids, None, None, pos, mlm_decode=False)
    return mlm.chunked_mlm_loss(o["mlm_hidden"], *o["mlm_decoder"], labels, w, chunk)[0]
  g_d, g_c = (jax.grad(loss)(params, c) for c in (0, 64))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_c), jax.tree.leaves(g_d)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_negative_chunk_is_a_config_error():
  from bepa_jax.config import validate as config_lib
  with pytest.raises(ConfigError, match="loss.mlm_vocab_chunk must be >= 0"):
    config_lib.validate(tiny_config(**{"loss.mlm_vocab_chunk": -1}), 8)


# --- the sharded train step --------------------------------------------------------------------

XLMR = {"model.family": "xlmr", "model.pad_token_id": 1, "model.type_vocab_size": 1,
        "model.layer_norm_eps": 1e-5, "model.max_position_embeddings": 40}
STEPS = {
    "bert_811": {"mesh.data": 8},
    "xlmr_222_packed": {**XLMR, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                        "data.packing": True},
    "bert_clean_pair": {"loss.cls_input": "clean", "loss.mlm_input": "pair", "mesh.data": 8},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("mlm_chunked"))  # shared: the tokenizer is trained once


def _one_step(config, workdir):
  job = build_lib.build(config, workdir, devices(8))
  batch = loop.global_batch(job.pipeline.batch(0), job.mesh)
  with jax.set_mesh(job.mesh):
    hlo = job.step_fn.lower(job.state, batch).compile().as_text()
    state, metrics = job.step_fn(job.state, batch)
  return (jax.device_get(state.params), {k: float(v) for k, v in jax.device_get(metrics).items()},
          hlo, job.model_cfg)


@pytest.mark.parametrize("case", list(STEPS))
def test_sharded_step_with_chunks_equals_the_dense_step(workdir, case):
  ref_params, ref, dense_hlo, mcfg = _one_step(tiny_config(**STEPS[case]), workdir)
  params, got, hlo, _ = _one_step(tiny_config(**STEPS[case], **{"loss.mlm_vocab_chunk": 64}),
                                  workdir)
  V, H = mcfg.vocab_size, mcfg.hidden_size
  assert V % 64 and ref["mlm_loss"] > 1.0  # a short last chunk
  for k in ("loss", "mlm_loss", "mlm_accuracy", "contrastive_loss", "grad_norm"):
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert_params_close(params, ref_params)
  # The dense step holds [positions, V] logits (their vocabulary shards under tensor
  # parallelism); the chunked one only E, its gradient, the bias, the optimizer's copies of
  # them, and their shards (each device streams the whole vocabulary: E is gathered over tensor).
  cfg = tiny_config(**STEPS[case])
  vocab = {V, V // cfg.mesh.tensor}
  hidden = {H, H // cfg.mesh.fsdp}
  assert _by_vocab(dense_hlo, vocab, hidden)
  assert not _by_vocab(hlo, vocab, hidden), _by_vocab(hlo, vocab, hidden)
