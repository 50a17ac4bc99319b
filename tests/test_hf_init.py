"""--config.init.hf_dir: continued pretraining from a local HF BERT / XLM-R checkpoint."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bepa_jax.trainer import build as build_lib  # noqa: E402
from bepa_jax.trainer import loop  # noqa: E402
from bepa_jax.hf import convert as hf, export, keymaps  # noqa: E402
from bepa_jax.data import corpus as corpus_lib, tokenizer as tokenizer_lib  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("spm"))
  return tokenizer_lib.train_sentencepiece(corpus_lib.load_embedded().texts(), out, 300)


def _hf_dir(root, family, spm_path):
  torch.manual_seed(0)
  common = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, hidden_act="gelu")
  if family == "bert":
    model = transformers.BertForMaskedLM(transformers.BertConfig(
        max_position_embeddings=32, type_vocab_size=2, pad_token_id=0, **common))
  else:
    model = transformers.XLMRobertaForMaskedLM(transformers.XLMRobertaConfig(
        max_position_embeddings=34, type_vocab_size=1, pad_token_id=0, layer_norm_eps=1e-5,
        **common))
  path = os.path.join(root, family)
  model.save_pretrained(path)  # safetensors
  export.export_sentencepiece_tokenizer(spm_path, path)
  return path


@pytest.mark.parametrize("family, scan", [("bert", False), ("xlmr", True)])
def test_training_starts_from_the_hf_weights(tmp_path, spm_model, family, scan):
  hf_dir = _hf_dir(str(tmp_path), family, spm_model)
  config = tiny_config(**{"init.hf_dir": hf_dir, "model.scan_layers": scan,
                          "model.hidden_size": 999})  # the HF config.json wins
  job = build_lib.build(config, str(tmp_path / "wd"))
  assert job.model_cfg.family == family and job.model_cfg.hidden_size == 32
  assert job.model_cfg.vocab_size == 300
  _, expected = hf.load_hf(hf_dir)
  got = keymaps.unstack_layers(jax.device_get(job.state.params))
  for (path, a) in jax.tree_util.tree_leaves_with_path(expected):
    node = got
    for k in path:
      node = node[k.key]
    np.testing.assert_array_equal(np.asarray(node), a, err_msg=jax.tree_util.keystr(path))
  batch = loop.global_batch(job.pipeline.batch(0), job.mesh)
  with jax.set_mesh(job.mesh):
    _, metrics = job.step_fn(job.state, batch)
  assert np.isfinite(float(metrics["loss"]))


def test_pickle_weights_are_refused_without_opt_in(tmp_path, spm_model):
  hf_dir = _hf_dir(str(tmp_path), "bert", spm_model)
  model = transformers.BertForMaskedLM.from_pretrained(hf_dir)
  os.remove(os.path.join(hf_dir, "model.safetensors"))
  torch.save(model.state_dict(), os.path.join(hf_dir, "pytorch_model.bin"))
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cmd = [sys.executable, "-m", "bepa_jax.cli.train", "--workdir", str(tmp_path / "wd"),
         f"--config.init.hf_dir={hf_dir}", "--config.train.steps=1", "--config.train.global_batch=8",
         "--config.data.max_length=16", "--config.model.max_position_embeddings=32"]
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  err = [l for l in r.stderr.splitlines() if l.startswith("bepa-train: error:")]
  assert err and "pytorch_model.bin" in err[0], r.stderr[-2000:]
  r = subprocess.run(cmd + ["--config.init.allow_pickle=True"], capture_output=True, text=True,
                     env=env, cwd=REPO, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
