"""bepa-export: a trained workdir -> an HF directory that transformers loads offline and that
reproduces our logits and our token ids."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bepa_jax.trainer import loop  # noqa: E402
from bepa_jax.cli import export as export_cli  # noqa: E402
from bepa_jax.data import tokenizers as tokenizers_lib  # noqa: E402
from bepa_jax import loading  # noqa: E402
from bepa_jax.model import BepaEncoder  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

TEXTS = ["The train to Berlin leaves at seven in the morning.",
         "Поезд в Берлин отправляется в семь часов утра.",
         "Το τρένο για το Βερολίνο φεύγει στις επτά το πρωί.",
         "¿Podría decirme dónde está la farmacia más cercana?",
         "Ünïcödé  with  double spaces, digits 2026 and 日本語"]


@pytest.fixture(scope="module", params=["bert", "xlmr"])
def trained(request, tmp_path_factory):
  family = request.param
  wd = str(tmp_path_factory.mktemp(f"export_{family}") / "wd")
  overrides = {"train.steps": 3, "checkpoint.every_steps": 3, "checkpoint.async_save": False}
  if family == "xlmr":
    overrides.update({"model.family": "xlmr", "model.type_vocab_size": 1,
                      "model.layer_norm_eps": 1e-5, "model.pad_token_id": 0,
                      "model.max_position_embeddings": 18})
  loop.train(tiny_config(**overrides), wd)
  return family, wd


def test_export_loads_in_transformers_with_same_logits(trained, tmp_path):
  family, wd = trained
  out = str(tmp_path / "hf")
  assert export_cli.main(["--workdir", wd, "--out", out]) == 0
  model, info = transformers.AutoModelForMaskedLM.from_pretrained(
      out, output_loading_info=True, local_files_only=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  expected = {"bert": "BertForMaskedLM", "xlmr": "XLMRobertaForMaskedLM"}[family]
  assert type(model).__name__ == expected
  model.eval()

  tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  ours = tokenizers_lib.load(os.path.join(wd, "tokenizer", "spm.model"))
  for text in TEXTS:  # the same ids, [CLS] s [SEP] laid out as in training
    ids = tok(text)["input_ids"]
    assert ids == [ours.cls_id] + ours.encode_batch([text])[0] + [ours.sep_id], text

  batch = tok(TEXTS[:3], padding=True, truncation=True, max_length=16, return_tensors="np")
  loaded = loading.load_workdir(wd)
  jax_logits = np.asarray(BepaEncoder(loaded.model_cfg).apply(
      {"params": loaded.params}, batch["input_ids"], None, batch["attention_mask"],
      method=BepaEncoder.mlm_logits_all))
  with torch.no_grad():
    pt_logits = model(input_ids=torch.tensor(batch["input_ids"]),
                      attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()
  real = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(pt_logits[real], jax_logits[real], atol=1e-4, rtol=1e-4)


def test_export_refuses_to_overwrite_and_names_missing_step(trained, tmp_path):
  _, wd = trained
  out = tmp_path / "existing"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  env = dict(os.environ, PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-m", "bepa_jax.cli.export", "--workdir", wd, "--out", str(out)],
                     capture_output=True, text=True, env=env)
  assert r.returncode == 2 and "refusing to overwrite" in r.stderr
  assert (out / "keep.txt").read_text() == "precious"
  r = subprocess.run([sys.executable, "-m", "bepa_jax.cli.export", "--workdir", wd, "--step", "77",
                      "--out", str(tmp_path / "new")], capture_output=True, text=True, env=env)
  assert r.returncode == 2 and "no checkpoint at step 77" in r.stderr, r.stderr
  assert not (tmp_path / "new").exists()
