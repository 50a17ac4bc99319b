"""Sequence packing (data.packing): a packed batch holds the same sentences as the padded one
and gives the same [CLS], MLM logits, loss and gradients (fp32, 1e-5), for BERT and XLM-R,
the clean-[CLS] and TLM options, sharded on 8 devices (data x fsdp), under gradient
accumulation and GradCache; a step that does not fit falls back, never cuts."""
import jax
import numpy as np
import pytest

from bepa_jax.trainer import build as build_lib
from bepa_jax.trainer import loop
from bepa_jax.data import packing
from bepa_jax.errors import ConfigError
from bepa_jax.objective.loss import Objective
from tests.helpers import (assert_gradcache_matches_end_to_end, assert_params_close, devices,
                           tiny_config)

MODES = {"masked": {}, "clean": {"loss.cls_input": "clean"},
         "pair": {"loss.cls_input": "clean", "loss.mlm_input": "pair"}}
L = 128  # rows of 128 tokens hold three of the tiny corpus's ~38-token sentences


def _cfg(mode="masked", family="bert", packed=True, **extra):
  over = {**MODES[mode], "train.global_batch": 16, "data.max_length": L,
          "model.max_position_embeddings": L + 2, "mesh.data": 4, "mesh.fsdp": 2,
          "data.packing": packed, **extra}
  if family == "xlmr":  # positions from pad+1; pad = the tokenizer's [PAD] (id 0)
    over.update({"model.family": "xlmr", "model.type_vocab_size": 1,
                 "model.layer_norm_eps": 1e-5})
  return tiny_config(**over)


def _pair(tmp_path, name, **kw):
  """(padded job, packed job) of the same config; the packed job gets the padded job's params."""
  return (build_lib.build(_cfg(packed=False, **kw), str(tmp_path / f"{name}_pad"), devices(8)),
          build_lib.build(_cfg(packed=True, **kw), str(tmp_path / f"{name}_pack"), devices(8)))


def _unpack(grid, seg, start, lengths):
  """The tokens of each item back from the packed grid [G, R, L] by its flat start index."""
  G, R, Lr = grid.shape
  flat, segs = grid.reshape(G, R * Lr), seg.reshape(G, R * Lr)
  return [[(flat[gi, s:s + n], segs[gi, s:s + n]) for s, n in zip(start[gi], lengths[gi])]
          for gi in range(G)]


def test_packed_batch_holds_the_padded_batch(tmp_path):
  """Every sentence (clean and masked) is in its group's rows, whole, as one segment whose
  first token is its [CLS]; MLM positions point at the same tokens; fewer rows than padded."""
  pad, pack = _pair(tmp_path, "layout", mode="clean")
  a, b = pad.pipeline.batch(3), pack.pipeline.batch(3)
  R = b["input_ids"].shape[1]
  assert b["input_ids"].shape == (8, R, L) and R < 4       # 8 groups of 2 pairs: 4 sentences
  assert b["cls_index"].shape == (16, 2) and b["mlm_positions"].shape == (16, 2, 3)
  assert b["attention_mask"].sum() == a["attention_mask"].sum()   # real tokens, packed or not
  groups = packing.pairs_by_group(16, 8, 1)
  for key in ("input_ids", "mlm_input_ids"):
    flat = b[key].reshape(8, -1)
    for gi, pairs in enumerate(groups):
      for q in pairs:                                       # the pairs of this group
        for side in range(2):
          n = int(a["attention_mask"][q, side].sum())
          s = int(b["cls_index"][q, side])
          np.testing.assert_array_equal(flat[gi, s:s + n], a[key][q, side, :n])
          seg = b["segment_ids"].reshape(8, -1)[gi, s:s + n]
          assert len(set(seg.tolist())) == 1 and seg[0] > 0
          np.testing.assert_array_equal(flat[gi, b["mlm_positions"][q, side]],
                                        a[key][q, side, a["mlm_positions"][q, side]])
  for k in ("mlm_ids", "mlm_weights", "text_hash"):
    np.testing.assert_array_equal(a[k], b[k])


def test_first_fit_is_deterministic_and_never_overfills():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 40, 50)
  row, offset, used = packing.first_fit(lengths, 64)
  for r in range(used):
    spans = sorted((offset[i], offset[i] + lengths[i]) for i in np.flatnonzero(row == r))
    assert spans[-1][1] <= 64 and all(e <= s for (_, e), (s, _) in zip(spans, spans[1:]))
  assert used >= -(-lengths.sum() // 64)
  r2, o2, u2 = packing.first_fit(lengths, 64)
  assert u2 == used and (r2 == row).all() and (o2 == offset).all()


def test_a_step_that_does_not_fit_falls_back_whole(tmp_path):
  """data.packed_rows=1 cannot hold 4 sentences: the step is packed one sentence per row
  (nothing cut or dropped, same tokens), and the fallback is counted and reported."""
  job = build_lib.build(_cfg(**{"data.packed_rows": 1}), str(tmp_path), devices(8))
  ref = build_lib.build(_cfg(packed=False), str(tmp_path / "pad"), devices(8)).pipeline.batch(0)
  b = job.pipeline.batch(0)
  assert b["input_ids"].shape == (8, 4, L)                 # 2 * 2 pairs per group
  assert job.pipeline.counters["packing_fallback_steps"] == 1
  assert "1 packing fallback steps" in job.pipeline.report()
  assert b["attention_mask"].sum() == ref["attention_mask"].sum()
  again = job.pipeline.batch(0, rows=(4, 0))               # what the other processes agree on
  np.testing.assert_array_equal(again["input_ids"], b["input_ids"])


def _encode(job, params, host, mode):
  obj = Objective(job.model, job.config.loss, job.mesh)
  def f(p, batch):
    enc = {"params": p}
    cls = obj._apply(enc, batch, "input_ids", "sentence", mode == "masked", None, True)
    ids_key = "input_ids" if mode == "masked" else "mlm_input_ids"
    mlm = obj._apply(enc, batch, ids_key, "pair" if mode == "pair" else "sentence", True,
                     None, True)
    return cls["cls"], mlm["mlm_logits"]
  with jax.set_mesh(job.mesh):
    batch = loop.global_batch(host, job.mesh)
    cls, logits = jax.jit(f)(params, batch)
    (loss, m), g = jax.jit(jax.value_and_grad(obj.loss_fn, has_aux=True))(
        params, batch, jax.random.key(0))
  return jax.device_get((cls, logits, loss, m, g))


@pytest.mark.parametrize("family", ["bert", "xlmr"])
@pytest.mark.parametrize("mode", list(MODES))
def test_packed_equals_padded_sharded(mode, family, tmp_path):
  pad, pack = _pair(tmp_path, "eq", mode=mode, family=family)
  params = pad.state.params
  w = pad.pipeline.batch(1)["mlm_weights"]
  cls_a, mlm_a, loss_a, m_a, g_a = _encode(pad, params, pad.pipeline.batch(1), mode)
  cls_b, mlm_b, loss_b, m_b, g_b = _encode(pack, params, pack.pipeline.batch(1), mode)
  assert pack.pipeline.batch(1)["input_ids"].shape[1] < 4  # really packed
  np.testing.assert_allclose(cls_b, cls_a, rtol=1e-5, atol=1e-5)
  real = w.reshape(mlm_a.shape[:2]) > 0                    # the logits of real predictions
  np.testing.assert_allclose(mlm_b[real], mlm_a[real], rtol=1e-5, atol=1e-5)
  for k in ("loss", "mlm_loss", "contrastive_loss"):
    np.testing.assert_allclose(float(m_b[k]), float(m_a[k]), rtol=1e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("over", [{"train.grad_accum_steps": 2},
                                  {"train.gradcache_chunks": 2}], ids=["accum", "gradcache"])
def test_packed_step_equals_padded_step(over, tmp_path):
  """The whole train step (micro-batches or GradCache chunks keep whole packing groups); both
  jobs start from the same initial state (packing does not change the parameters)."""
  pad, pack = _pair(tmp_path, "step", mode="pair", family="xlmr",
                    **{"train.global_batch": 32, **over})
  b = pack.pipeline.batch(0)
  assert b["input_ids"].shape[0] == 16 and b["input_ids"].shape[1] < 4
  with jax.set_mesh(pad.mesh):
    s1, m1 = pad.step_fn(pad.state, loop.global_batch(pad.pipeline.batch(0), pad.mesh))
  with jax.set_mesh(pack.mesh):
    s2, m2 = pack.step_fn(pack.state, loop.global_batch(b, pack.mesh))
  for k in ("loss", "mlm_loss", "contrastive_loss", "grad_norm"):
    np.testing.assert_allclose(float(m2[k]), float(m1[k]), rtol=1e-5, err_msg=k)
  assert_params_close(jax.device_get(s2.params), jax.device_get(s1.params))


def test_packed_gradcache_is_exact_with_dropout_on(tmp_path):
  cfg = _cfg("pair", **{"model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
                        "train.global_batch": 32, "train.gradcache_chunks": 2})
  job = build_lib.build(cfg, str(tmp_path), devices(8))
  assert_gradcache_matches_end_to_end(job)


def test_resume_with_other_packing_is_named(tmp_path):
  pad, pack = _pair(tmp_path, "resume")
  with pytest.raises(ConfigError, match="data.packing: None -> True"):
    pack.pipeline.verify_state(pad.pipeline.state_dict(4))
  assert pack.pipeline.verify_state(pack.pipeline.state_dict(4)) == []


def test_packing_config_errors_are_one_line():
  """The config's validation pass is the one place the data.packing rules are checked (the
  pipeline does not check them again)."""
  from bepa_jax.config import validate as config_lib
  with pytest.raises(ConfigError, match=r"data.packed_rows=5 exceeds the 4 sequences"):
    config_lib.validate(_cfg(**{"data.packed_rows": 5}), 8)
  with pytest.raises(ConfigError, match="data.packed_pair_rows must be >= 0"):
    config_lib.validate(_cfg(**{"data.packed_pair_rows": -1}), 8)
  with pytest.raises(ConfigError, match=r"data.packed_pair_rows=3 exceeds the 2 sequences"):
    config_lib.validate(_cfg("pair", **{"data.packed_pair_rows": 3}), 8)
  assert config_lib.validate(_cfg("pair", **{"data.packed_rows": 4,
                                             "data.packed_pair_rows": 2}), 8) == (4, 2, 1)


@pytest.mark.parametrize("over,match", [
    ({"train.global_batch": 12}, r"global_batch=12 \(micro-batch 12\) is not divisible by the 8 "
                                 r"batch shards"),
    ({"train.grad_accum_steps": 4}, r"global_batch=16 \(micro-batch 4\) is not divisible by the "
                                    r"8 batch shards"),
    ({"train.gradcache_chunks": 4}, r"global_batch=16 is not divisible by "
                                    r"train.gradcache_chunks=4 x 8 batch shards"),
], ids=["shards", "accum", "gradcache"])
def test_packing_groups_must_divide_the_batch(over, match):
  """Packing groups (batch shards x micro-batches or chunks) split the global batch evenly."""
  from bepa_jax.config import validate as config_lib
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(_cfg(**over), 8)
