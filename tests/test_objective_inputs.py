"""The authors' step: [CLS] from clean passes (loss.cls_input=clean) and TLM pair-sequence MLM
(loss.mlm_input=pair), checked against a hand-written reference, sharded on 8 devices and
under GradCache, for BERT and XLM-R."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bepa_jax.trainer import build as build_lib
from bepa_jax.trainer import loop
from bepa_jax.errors import ConfigError
from tests.helpers import (assert_gradcache_matches_end_to_end, assert_params_close, devices,
                           tiny_config)

MODES = {"clean_sentence": {"loss.cls_input": "clean", "loss.mlm_input": "sentence"},
         "clean_pair": {"loss.cls_input": "clean", "loss.mlm_input": "pair"}}


def _cfg(mode, family="bert", **extra):
  over = {**MODES[mode], "train.global_batch": 8, "data.max_length": 20,
          "data.max_predictions_per_seq": 3, **extra}
  if family == "xlmr":
    over.update({"model.family": "xlmr", "model.pad_token_id": 1, "model.type_vocab_size": 1,
                 "model.layer_norm_eps": 1e-5, "model.max_position_embeddings": 40})
  return tiny_config(**over)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
  out = {}
  for mode in MODES:
    out[mode] = build_lib.build(_cfg(mode), str(tmp_path_factory.mktemp(mode)), devices(8))
  return out


def test_clean_mode_batch_is_the_masked_modes_batch_split_in_two(jobs, tmp_path):
  """cls_input=clean: input_ids are the unmasked sentences; mlm_input_ids are exactly the
  default mode's masked input (same masking draws)."""
  default = build_lib.build(_cfg("clean_sentence", **{"loss.cls_input": "masked"}), str(tmp_path),
                        devices(8)).pipeline.batch(3)
  clean = jobs["clean_sentence"].pipeline.batch(3)
  np.testing.assert_array_equal(clean["mlm_input_ids"], default["input_ids"])
  for k in ("mlm_positions", "mlm_ids", "mlm_weights", "attention_mask"):
    np.testing.assert_array_equal(clean[k], default[k])
  # the clean sentence holds the label at every masked position
  ids, pos, lab, w = (clean[k] for k in ("input_ids", "mlm_positions", "mlm_ids",
                                           "mlm_weights"))
  got = np.take_along_axis(ids, pos, axis=2)
  np.testing.assert_array_equal(np.where(w > 0, got, 0), np.where(w > 0, lab, 0))


def test_pair_sequence_layout_truncation_and_masking(jobs):
  job = jobs["clean_pair"]
  tok, L, P = job.tokenizer, 20, 3
  half = (L - 4) // 2
  batch = job.pipeline.batch(5)
  assert batch["mlm_input_ids"].shape == (8, L) and batch["mlm_positions"].shape == (8, 2 * P)
  for r in range(8):
    sides = []
    for s in range(2):
      row = batch["input_ids"][r, s]
      n = int(batch["attention_mask"][r, s].sum()) - 2
      sides.append(list(row[1:n + 1])[:half])        # each side cut to (L - 4) // 2 tokens
    x, y = sides
    want = [tok.cls_id, *x, tok.sep_id, tok.cls_id, *y, tok.sep_id]
    seq = batch["mlm_input_ids"][r].copy()
    pos, lab, w = batch["mlm_positions"][r], batch["mlm_ids"][r], batch["mlm_weights"][r]
    real = pos[w > 0]
    seq[real] = lab[w > 0]                           # undo the masking
    assert list(seq[:len(want)]) == want and set(seq[len(want):]) <= {tok.pad_id}
    assert batch["mlm_attention_mask"][r].sum() == len(want)
    specials = {0, len(x) + 1, len(x) + 2, len(x) + len(y) + 3}
    assert not specials & set(real.tolist())         # specials are never masked
    k = int(np.clip(round((len(x) + len(y)) * 0.15), 1, 2 * P))
    assert len(real) == k                            # 15% of both sides jointly


def test_pair_needs_clean_cls_in_one_line():
  from bepa_jax.config import validate as config_lib
  with pytest.raises(ConfigError, match="loss.mlm_input=pair needs loss.cls_input=clean"):
    config_lib.validate(tiny_config(**{"loss.mlm_input": "pair"}), 8)
  with pytest.raises(ConfigError, match="loss.cls_input must be masked or clean"):
    config_lib.validate(tiny_config(**{"loss.cls_input": "dirty"}), 8)
  with pytest.raises(ConfigError, match="loss.mlm_input must be sentence or pair"):
    config_lib.validate(tiny_config(**{"loss.cls_input": "clean", "loss.mlm_input": "both"}), 8)


def _reference(model, params, batch, cfg):
  """The authors' step written out: clean [CLS] per sentence, one MLM pass, dense InfoNCE."""
  from bepa_jax.model import encoder_params
  enc = {"params": encoder_params(params)}
  B = batch["input_ids"].shape[0]
  flat = lambda a: a.reshape((2 * B,) + a.shape[2:])
  cls = model.apply(enc, flat(batch["input_ids"]), flat(batch["token_type_ids"]),
                    flat(batch["attention_mask"]), None, deterministic=True)["cls"]
  z = cls / jnp.linalg.norm(cls, axis=-1, keepdims=True)
  zx, zy = z[0::2], z[1::2]
  logits = zx @ zy.T / float(cfg.loss.temperature)
  ce = lambda lg: jnp.mean(jax.nn.logsumexp(lg, axis=1) - jnp.diagonal(lg))
  con = 0.5 * (ce(logits) + ce(logits.T))
  if cfg.loss.mlm_input == "pair":
    ids = batch["mlm_input_ids"]
    out = model.apply(enc, ids, jnp.zeros_like(ids), batch["mlm_attention_mask"],
                      batch["mlm_positions"], deterministic=True)
    lab, w = batch["mlm_ids"], batch["mlm_weights"]
  else:
    out = model.apply(enc, flat(batch["mlm_input_ids"]), flat(batch["token_type_ids"]),
                      flat(batch["attention_mask"]), flat(batch["mlm_positions"]),
                      deterministic=True)
    lab, w = flat(batch["mlm_ids"]), flat(batch["mlm_weights"])
  logp = jax.nn.log_softmax(out["mlm_logits"].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, lab[..., None], axis=-1)[..., 0]
  mlm = jnp.sum(nll * w) / jnp.sum(w)
  return mlm + float(cfg.loss.weight) * con, (mlm, con)


@pytest.mark.parametrize("family", ["bert", "xlmr"])
@pytest.mark.parametrize("mode", list(MODES))
def test_loss_and_gradient_match_the_reference_sharded(mode, family, tmp_path):
  from bepa_jax.objective.loss import Objective
  cfg = _cfg(mode, family)
  job = build_lib.build(cfg, str(tmp_path), devices(8))
  host = job.pipeline.batch(2)
  obj = Objective(job.model, cfg.loss, job.mesh)
  params = job.state.params
  with jax.set_mesh(job.mesh):
    batch = loop.global_batch(host, job.mesh)
    (loss, m), g = jax.jit(jax.value_and_grad(obj.loss_fn, has_aux=True))(
        params, batch, jax.random.key(0))
  (ref, (mlm, con)), g_ref = jax.value_and_grad(_reference, argnums=1, has_aux=True)(
      job.model, jax.device_get(params), jax.tree.map(jnp.asarray, host), cfg)
  np.testing.assert_allclose(float(m["mlm_loss"]), float(mlm), rtol=1e-5)
  np.testing.assert_allclose(float(m["contrastive_loss"]), float(con), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(g)), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("mode", list(MODES))
def test_gradcache_equals_the_plain_step(mode, tmp_path):
  """Dropout off: the chunked step (train.gradcache_chunks=2) makes the plain step's update."""
  plain = build_lib.build(_cfg(mode, **{"train.global_batch": 16}), str(tmp_path / "a"), devices(8))
  cached = build_lib.build(_cfg(mode, **{"train.global_batch": 16, "train.gradcache_chunks": 2}),
                       str(tmp_path / "b"), devices(8))
  batch = plain.pipeline.batch(0)
  with jax.set_mesh(plain.mesh):
    s1, m1 = plain.step_fn(plain.state, loop.global_batch(batch, plain.mesh))
  with jax.set_mesh(cached.mesh):
    s2, m2 = cached.step_fn(cached.state, loop.global_batch(batch, cached.mesh))
  for k in ("loss", "mlm_loss", "contrastive_loss", "grad_norm"):
    np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-5, err_msg=k)
  # One Adam step from a ~0 gradient can move an element by up to ~lr (see assert_params_close);
  # the TLM case's position embeddings reached 0.24 x lr (2.4e-4) on a loaded box: bound 0.5 x lr.
  # The loss, MLM, contrastive and gradient-norm agreement above is the tight check.
  assert_params_close(jax.device_get(s2.params), jax.device_get(s1.params), loose=5e-4)


@pytest.mark.parametrize("mode", list(MODES))
def test_gradcache_is_exact_with_dropout_on(mode, tmp_path):
  """Dropout on: the clean and the MLM pass draw their own keys, the same in GradCache's two
  passes, so its gradient is that of the same stochastic loss differentiated end to end."""
  cfg = _cfg(mode, **{"model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
                      "train.global_batch": 16})
  job = build_lib.build(cfg, str(tmp_path), devices(8))
  assert_gradcache_matches_end_to_end(job)


def test_changing_the_objective_input_on_resume_is_named(jobs):
  state = jobs["clean_sentence"].pipeline.state_dict(4)
  with pytest.raises(ConfigError, match="loss.mlm_input: None -> 'pair'"):
    jobs["clean_pair"].pipeline.verify_state(state)
