"""HF interop: parity with transformers' BertForMaskedLM / XLMRobertaForMaskedLM, exact round
trips, save_hf -> from_pretrained, and the one-line errors. Tiny random models, offline."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import jax
import jax.numpy as jnp
from flax.linen import meta

from bepa_jax.errors import HFFormatError
from bepa_jax.hf import convert as hf, keymaps
from bepa_jax.model import BepaEncoder, EncoderConfig

# (family, hidden, layers, heads, intermediate, vocab, max_positions, type_vocab)
SIZES = [
    ("bert", 32, 2, 4, 64, 100, 40, 2),
    ("bert", 64, 3, 8, 128, 300, 64, 3),
    ("xlmr", 32, 2, 4, 64, 120, 40, 1),
    ("xlmr", 64, 2, 8, 96, 300, 64, 1),
]
TIED_OR_BUFFERS = ("decoder.", "position_ids", "token_type_ids")


def _hf_model(family, hidden, layers, heads, inter, vocab, max_pos, types, seed=0):
  common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=heads, intermediate_size=inter,
                max_position_embeddings=max_pos, type_vocab_size=types)
  torch.manual_seed(seed)
  if family == "bert":
    model = transformers.BertForMaskedLM(transformers.BertConfig(**common),)
  else:
    model = transformers.XLMRobertaForMaskedLM(
        transformers.XLMRobertaConfig(layer_norm_eps=1e-5, pad_token_id=1, **common))
  with torch.no_grad():  # HF inits LayerNorm to 1/0 and biases to 0: make every tensor random
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def _state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _batch(cfg, batch=3, length=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, cfg.vocab_size, size=(batch, length)).astype(np.int32)
  lengths = [length, length - 4, 5][:batch]
  mask = np.zeros_like(ids)
  for b, n in enumerate(lengths):
    mask[b, :n] = 1
  ids = np.where(mask == 1, ids, cfg.pad_token_id).astype(np.int32)
  types = np.zeros_like(ids)
  if cfg.type_vocab_size > 1:
    for b, n in enumerate(lengths):
      types[b, n // 2:n] = 1
  return ids, types, mask


def _ours(params, cfg, ids, types, mask):
  """(last hidden, MLM logits at every position); deterministic (no dropout)."""
  model = BepaEncoder(cfg)
  positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
  out = jax.jit(lambda p: model.apply({"params": p}, ids, types, mask, positions,
                                      deterministic=True))(params)
  return np.asarray(out["hidden"]), np.asarray(out["mlm_logits"])


def _theirs(model, ids, types, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                token_type_ids=torch.tensor(types, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long), output_hidden_states=True)
  return out.hidden_states[-1].numpy(), out.logits.numpy()


def _init_shapes(cfg):
  """model.init's boxed tree of ShapeDtypeStructs (no compute)."""
  return jax.eval_shape(lambda: BepaEncoder(cfg).init(
      jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32),
      mlm_positions=jnp.zeros((1, 2), jnp.int32)))


def _init_ours(cfg, seed=0):
  """A params tree with model.init's structure and shapes and every tensor random (numpy)."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    scale = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0  # LayerNorm ~1
    return (scale + 0.05 * rng.standard_normal(x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, meta.unbox(_init_shapes(cfg)["params"]))


def _cfg_of(model, **overrides):
  return hf.encoder_config_from_hf(model.config.to_dict(), **overrides)


# ------------------------------------------------------------------------------------------
# parity

@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}-h{s[1]}-l{s[2]}")
def test_parity_hf_to_ours(size):
  model = _hf_model(*size)
  cfg = _cfg_of(model)
  assert cfg.family == size[0]
  assert cfg.layer_norm_eps == model.config.layer_norm_eps
  params = hf.hf_state_dict_to_params(_state(model), cfg)
  ids, types, mask = _batch(cfg)
  h_ours, l_ours = _ours(params, cfg, ids, types, mask)
  h_hf, l_hf = _theirs(model, ids, types, mask)
  keep = mask.astype(bool)
  np.testing.assert_allclose(h_ours[keep], h_hf[keep], atol=1e-4, rtol=0)
  np.testing.assert_allclose(l_ours[keep], l_hf[keep], atol=1e-4, rtol=0)
  # the test is not vacuous: the batch really is padded, typed, and outputs are non-trivial
  assert not keep.all() and (types.max() > 0) == (cfg.type_vocab_size > 1)
  assert np.abs(l_hf[keep]).max() > 0.1


# ------------------------------------------------------------------------------------------
# exact round trips

@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("size", [SIZES[1], SIZES[3]], ids=["bert", "xlmr"])
def test_round_trip_hf_ours_hf_is_exact(size, scan):
  model = _hf_model(*size)
  cfg = _cfg_of(model, scan_layers=scan)
  sd = _state(model)
  params = hf.hf_state_dict_to_params(sd, cfg)
  enc = params["encoder"]
  if scan:
    assert list(enc) == ["layers"]
    assert enc["layers"]["attention"]["query"]["kernel"].shape == (
        cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim)
  else:
    assert sorted(enc) == [f"layer_{i}" for i in range(cfg.num_layers)]
  back = hf.params_to_hf_state_dict(params, cfg)
  expected = {k for k in sd if not any(t in k for t in TIED_OR_BUFFERS)}
  assert set(back) == expected
  for k in expected:
    assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k


@pytest.mark.parametrize("family", ["bert", "xlmr"])
def test_tree_matches_model_init_and_stack_unstack(family):
  for scan in (False, True):
    cfg = EncoderConfig(vocab_size=50, family=family, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=48, max_position_embeddings=24, scan_layers=scan,
                        pad_token_id=1 if family == "xlmr" else 0, remat="full")
    shapes = meta.unbox(_init_shapes(cfg)["params"])
    ref = _init_ours(cfg)  # scanned or not, as model.init makes it for this cfg
    boxed = {"params": jax.tree.map(  # as model.init returns it: boxed, wrapped, jax arrays
        lambda box, x: box.replace_boxed(jnp.asarray(x)), _init_shapes(cfg)["params"], ref,
        is_leaf=lambda x: isinstance(x, meta.Partitioned))}
    got = hf.hf_state_dict_to_params(hf.params_to_hf_state_dict(boxed, cfg), cfg)
    assert jax.tree.structure(got) == jax.tree.structure(shapes)
    for a, b, s in zip(jax.tree.leaves(got), jax.tree.leaves(ref), jax.tree.leaves(shapes)):
      assert a.shape == s.shape and a.dtype == s.dtype and np.array_equal(a, b)
  # stack/unstack are inverses (numpy and jax leaves, with and without the {'params'} wrapper)
  unscanned = _init_ours(EncoderConfig(vocab_size=50, family=family, hidden_size=32, num_layers=3,
                                       num_heads=4, intermediate_size=48,
                                       max_position_embeddings=24))
  stacked = keymaps.stack_layers(unscanned)
  assert stacked["encoder"]["layers"]["output"]["kernel"].shape == (3, 48, 32)
  again = keymaps.unstack_layers({"params": jax.tree.map(jnp.asarray, stacked)})["params"]
  assert jax.tree.structure(again) == jax.tree.structure(unscanned)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(unscanned)):
    assert np.array_equal(np.asarray(a), b)
  assert keymaps.stack_layers(stacked)["encoder"].keys() == {"layers"}  # idempotent


# ------------------------------------------------------------------------------------------
# save_hf -> transformers

@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("family", ["bert", "xlmr"])
def test_save_hf_loads_in_transformers(tmp_path, family, scan):
  cfg = EncoderConfig(vocab_size=150, family=family, hidden_size=48, num_layers=2, num_heads=4,
                      intermediate_size=80, max_position_embeddings=32,
                      type_vocab_size=2 if family == "bert" else 1,
                      layer_norm_eps=1e-12 if family == "bert" else 1e-5,
                      pad_token_id=0 if family == "bert" else 1, scan_layers=scan)
  params = _init_ours(cfg, seed=3)  # encoder/layers/... when scan
  assert ("layers" in params["encoder"]) == scan
  hf.save_hf(tmp_path, params, cfg)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  model, info = transformers.AutoModelForMaskedLM.from_pretrained(
      str(tmp_path), output_loading_info=True, attn_implementation="eager")
  model.eval()
  want_cls = transformers.BertForMaskedLM if family == "bert" else (
      transformers.XLMRobertaForMaskedLM)
  assert type(model) is want_cls
  # transformers 5 ties the decoder itself and reports nothing for it
  assert {k: set(v) for k, v in info.items()} == {
      "missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
      "error_msgs": set()}
  assert model.get_output_embeddings().weight.data_ptr() == (
      model.get_input_embeddings().weight.data_ptr())
  assert model.config.layer_norm_eps == cfg.layer_norm_eps
  assert model.config.pad_token_id == cfg.pad_token_id
  assert model.config.hidden_act == "gelu"

  ids, types, mask = _batch(cfg, seed=1)
  h_ours, l_ours = _ours(params, cfg, ids, types, mask)
  h_hf, l_hf = _theirs(model, ids, types, mask)
  keep = mask.astype(bool)
  np.testing.assert_allclose(h_ours[keep], h_hf[keep], atol=1e-4, rtol=0)
  np.testing.assert_allclose(l_ours[keep], l_hf[keep], atol=1e-4, rtol=0)

  # and load_hf reads it back exactly, config included
  cfg2, params2 = hf.load_hf(tmp_path, scan_layers=scan)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params)):
    assert np.array_equal(a, np.asarray(b))


def test_load_hf_reads_save_pretrained_output(tmp_path):
  model = _hf_model(*SIZES[2])
  model.save_pretrained(tmp_path)
  cfg, params = hf.load_hf(tmp_path)
  assert cfg == _cfg_of(model)
  ref = hf.hf_state_dict_to_params(_state(model), cfg)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    assert np.array_equal(a, b)


def test_config_round_trip():
  cfg = EncoderConfig(vocab_size=77, family="xlmr", hidden_size=32, num_layers=3, num_heads=2,
                      intermediate_size=50, max_position_embeddings=66, type_vocab_size=1,
                      layer_norm_eps=1e-5, pad_token_id=1, hidden_dropout=0.2,
                      attention_dropout=0.0, initializer_range=0.01)
  d = hf.hf_config_dict(cfg)
  assert d["model_type"] == "xlm-roberta" and d["architectures"] == ["XLMRobertaForMaskedLM"]
  assert hf.encoder_config_from_hf(json.loads(json.dumps(d))) == cfg
  bert = dict(hf.hf_config_dict(EncoderConfig(vocab_size=10, hidden_size=8, num_heads=2)))
  assert bert["model_type"] == "bert" and bert["architectures"] == ["BertForMaskedLM"]
  assert bert["layer_norm_eps"] == 1e-12 and bert["pad_token_id"] == 0
  assert hf.encoder_config_from_hf({"model_type": "roberta", "vocab_size": 10}).family == "xlmr"
  assert hf.encoder_config_from_hf(d, dtype="bfloat16", remat="full").dtype == "bfloat16"


def test_input_tolerates_tied_decoder_pooler_and_buffers():
  model = _hf_model(*SIZES[0])
  sd = _state(model)
  assert "cls.predictions.decoder.weight" in sd  # torch state_dict has the tied copies
  sd["bert.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
  sd["bert.pooler.dense.bias"] = np.zeros((32,), np.float32)
  sd["bert.embeddings.position_ids"] = np.arange(40)[None]
  cfg = _cfg_of(model)
  params = hf.hf_state_dict_to_params(sd, cfg)
  # an untied decoder would silently change the model: refused
  bad = dict(sd)
  bad["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + 1
  with pytest.raises(HFFormatError, match="cls.predictions.decoder.weight.*not tied"):
    hf.hf_state_dict_to_params(bad, cfg)
  assert params["mlm_head"]["bias"].shape == (cfg.vocab_size,)


# ------------------------------------------------------------------------------------------
# errors

def _one_line(excinfo):
  msg = str(excinfo.value)
  assert "\n" not in msg and isinstance(excinfo.value, ValueError)
  return msg


def test_error_unsupported_model_type(tmp_path):
  with pytest.raises(HFFormatError) as e:
    hf.encoder_config_from_hf({"model_type": "gpt2"})
  msg = _one_line(e)
  assert "'gpt2'" in msg and "bert" in msg and "xlm-roberta" in msg
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "deberta-v2"}))
  with pytest.raises(HFFormatError, match="unsupported model_type 'deberta-v2'"):
    hf.load_hf(tmp_path)
  with pytest.raises(HFFormatError, match="hidden_act 'relu'"):
    hf.encoder_config_from_hf({"model_type": "bert", "hidden_act": "relu"})


def test_error_missing_files(tmp_path):
  with pytest.raises(HFFormatError) as e:
    hf.load_hf(tmp_path)
  assert "config.json" in _one_line(e) and str(tmp_path) in str(e.value)
  (tmp_path / "config.json").write_text(json.dumps(hf.hf_config_dict(
      EncoderConfig(vocab_size=10, hidden_size=8, num_heads=2, num_layers=1))))
  with pytest.raises(HFFormatError) as e:
    hf.load_hf(tmp_path)
  msg = _one_line(e)
  assert str(tmp_path) in msg and "model.safetensors" in msg and "pytorch_model.bin" in msg
  with pytest.raises(HFFormatError, match="does not exist"):
    hf.load_hf(tmp_path / "nope")


def test_error_missing_key_and_unexpected_key():
  model = _hf_model(*SIZES[0])
  cfg = _cfg_of(model)
  sd = _state(model)
  del sd["bert.encoder.layer.1.intermediate.dense.bias"]
  with pytest.raises(HFFormatError) as e:
    hf.hf_state_dict_to_params(sd, cfg)
  assert "'bert.encoder.layer.1.intermediate.dense.bias'" in _one_line(e)
  sd = _state(model)
  sd["bert.encoder.layer.2.output.dense.weight"] = np.zeros((32, 64), np.float32)
  with pytest.raises(HFFormatError, match="unexpected key 'bert.encoder.layer.2"):
    hf.hf_state_dict_to_params(sd, cfg)
  # an XLM-R state dict is not a BERT one
  with pytest.raises(HFFormatError, match="missing key 'bert.embeddings"):
    hf.hf_state_dict_to_params(_state(_hf_model(*SIZES[2])), cfg)


def test_error_wrong_shape_names_key_and_shapes(tmp_path):
  model = _hf_model(*SIZES[0])
  cfg = _cfg_of(model)
  sd = _state(model)
  sd["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((65, 32), np.float32)
  with pytest.raises(HFFormatError) as e:
    hf.hf_state_dict_to_params(sd, cfg)
  msg = _one_line(e)
  assert "'bert.encoder.layer.0.intermediate.dense.weight'" in msg
  assert "(64, 32)" in msg and "(65, 32)" in msg
  # a config.json that disagrees with the weights
  model.save_pretrained(tmp_path)
  conf = json.loads((tmp_path / "config.json").read_text())
  conf["vocab_size"] = 101
  (tmp_path / "config.json").write_text(json.dumps(conf))
  with pytest.raises(HFFormatError) as e:
    hf.load_hf(tmp_path)
  msg = _one_line(e)
  assert "'bert.embeddings.word_embeddings.weight'" in msg
  assert "(101, 32)" in msg and "(100, 32)" in msg
  # ours -> HF checks our tree against the config too
  params = hf.hf_state_dict_to_params(_state(model), cfg)
  params["encoder"]["layer_1"]["attention"]["query"]["kernel"] = np.zeros((32, 8, 4), np.float32)
  with pytest.raises(HFFormatError) as e:
    hf.params_to_hf_state_dict(params, cfg)
  msg = _one_line(e)
  assert "encoder/layer_1/attention/query/kernel" in msg
  assert "(32, 4, 8)" in msg and "(32, 8, 4)" in msg
  with pytest.raises(HFFormatError, match="2 encoder layers but config.num_layers is 3"):
    hf.params_to_hf_state_dict(hf.hf_state_dict_to_params(_state(model), cfg),
                               EncoderConfig(**{**cfg.__dict__, "num_layers": 3}))


def test_pickle_refused_unless_allowed(tmp_path):
  model = _hf_model(*SIZES[0])
  model.config.save_pretrained(tmp_path)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(HFFormatError) as e:
    hf.load_hf(tmp_path)
  msg = _one_line(e)
  assert "pytorch_model.bin" in msg and "allow_pickle=True" in msg
  cfg, params = hf.load_hf(tmp_path, allow_pickle=True)
  ref = hf.hf_state_dict_to_params(_state(model), cfg)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    assert np.array_equal(a, b)


def test_load_hf_bfloat16_and_sharded(tmp_path):
  model = _hf_model(*SIZES[1])
  model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="50KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  cfg, params = hf.load_hf(tmp_path)
  ref = hf.hf_state_dict_to_params(
      {k: v.float().numpy() for k, v in model.state_dict().items()}, cfg)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    assert a.dtype == np.float32 and np.array_equal(a, b)


def test_hf_errors_are_input_errors_and_hf_sits_below_loading(tmp_path):
  """HFFormatError reaches the commands as it is (an InputError); data/ never reads HF dirs and
  hf/ never imports loading.py, the commands or the trainer (docs: the layout's floors)."""
  import ast
  import glob
  from bepa_jax.errors import InputError
  assert issubclass(HFFormatError, InputError)
  (tmp_path / "config.json").write_text("[1]")
  with pytest.raises(InputError, match="config.json is not a JSON object"):
    hf.load_hf(tmp_path)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  banned = {"data": ("bepa_jax.hf",),
            "hf": ("bepa_jax.loading", "bepa_jax.cli", "bepa_jax.trainer")}
  for package, prefixes in banned.items():
    for path in glob.glob(os.path.join(root, "bepa_jax", package, "*.py")):
      for node in ast.walk(ast.parse(open(path).read())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [f"{node.module}.{a.name}" for a in node.names]
                 if isinstance(node, ast.ImportFrom) and node.module else [])
        bad = [n for n in names if n.startswith(prefixes)]
        assert not bad, f"{os.path.relpath(path, root)} imports {bad}"
