"""Reliability suite: bad input to a bepa-* command is refused with one clear line, never a
traceback.

Every case runs the real CLI as a subprocess and asserts its exit status (2), exactly one error
line naming the problem (the file, flag or key and what is wrong), no traceback, and that
nothing already saved changed (model dirs, an existing workdir) and no output was written.
One tiny trained workdir and its HF export, with damaged copies, serve every case.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("safetensors")

from safetensors.numpy import load_file, save_file  # noqa: E402

from bepa_jax.trainer import loop  # noqa: E402
from bepa_jax.data import corpus as corpus_lib  # noqa: E402
from bepa_jax import loading  # noqa: E402
from bepa_jax.hf import convert as hf  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

MODULES = {"bepa-train": "bepa_jax.cli.train", "bepa-eval": "bepa_jax.cli.eval",
           "bepa-sweep": "bepa_jax.cli.sweep"}
# ml_collections < 1.1 parsed tuple overrides as Python literals, so `--config.mesh.rules=foo`
# reached ConfigDict as the string 'foo' and raised TypeError; this runs bepa-train that way.
OLD_TUPLE_PARSER = ("import sys\n"
                    "from ml_collections.config_flags import config_flags as cf\n"
                    "cf._FIELD_TYPE_TO_PARSER[tuple] = cf._LiteralParser()\n"
                    "from bepa_jax.cli import train\n"
                    "sys.argv[0] = 'bepa-train'\n"
                    "train.run()\n")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """A trained workdir, its HF export, damaged copies of both, and two aligned test files."""
  root = tmp_path_factory.mktemp("bad_inputs")
  wd = str(root / "workdir")
  loop.train(tiny_config(**{"train.steps": 2, "checkpoint.every_steps": 2,
                             "checkpoint.async_save": False}), wd)
  loaded = loading.load_workdir(wd)
  export = str(root / "hf")
  hf.save_hf(export, loaded.params, loaded.model_cfg)  # what bepa-export writes
  shutil.copy(os.path.join(wd, "tokenizer", "spm.model"), os.path.join(export, "spm.model"))
  paths = {"workdir": wd, "hf": export}

  def damaged(name, damage):
    path = str(root / name)
    shutil.copytree(export, path)
    damage(os.path.join(path, "model.safetensors"))
    paths[name] = path

  damaged("truncated", lambda f: os.truncate(f, os.path.getsize(f) // 2))
  damaged("no_weights", os.remove)

  def nan_embeddings(f):
    state = load_file(f)
    key = next(k for k in state if k.endswith("word_embeddings.weight"))
    state[key] = np.full_like(state[key], np.nan)
    save_file(state, f, metadata={"format": "pt"})
  damaged("nan_weights", nan_embeddings)

  paths["no_ckpt"] = str(root / "no_ckpt")
  shutil.copytree(wd, paths["no_ckpt"], ignore=shutil.ignore_patterns("checkpoints"))
  paths["not_spm"] = str(root / "tok.model")
  (root / "tok.model").write_text("not a sentencepiece model\n")
  paths["bad_hf_tok"] = str(root / "bad_hf_tok")
  os.makedirs(paths["bad_hf_tok"])
  (root / "bad_hf_tok" / "tokenizer_config.json").write_text("{}\n")
  corpus = corpus_lib.load_embedded()
  for lang in ("de", "en"):
    column = [r[corpus.languages.index(lang)] for r in corpus.rows[:16]]
    (root / f"test.{lang}").write_text("".join(s + "\n" for s in column), encoding="utf-8")
    paths[f"test_{lang}"] = str(root / f"test.{lang}")
  paths["root"] = str(root)
  return paths


# (case, CLI, arguments, what the one error line must contain); {name} = a path of `models`.
CASES = [
    # 1. a cut-off model.safetensors, given to bepa-eval (as an HF dir or a "workdir") and train
    ("eval-truncated-weights", "bepa-eval", ["--hf-dir", "{truncated}"],
     "{truncated}/model.safetensors: truncated ("),
    ("eval-truncated-weights-as-workdir", "bepa-eval", ["--workdir", "{truncated}"],
     "{truncated}/model.safetensors: truncated ("),
    ("train-init-truncated-weights", "bepa-train", ["--config.init.hf_dir={truncated}"],
     "init.hf_dir: {truncated}/model.safetensors: truncated ("),
    # 2. a model dir without its weights says so (not that a tokenizer is missing)
    ("eval-missing-weights", "bepa-eval", ["--hf-dir", "{no_weights}"],
     "{no_weights}/model.safetensors: weights file missing"),
    ("eval-missing-weights-as-workdir", "bepa-eval", ["--workdir", "{no_weights}"],
     "{no_weights}/model.safetensors: weights file missing"),
    ("eval-workdir-without-checkpoints", "bepa-eval", ["--workdir", "{no_ckpt}"],
     "{no_ckpt}: no checkpoints"),
    ("train-init-missing-weights", "bepa-train", ["--config.init.hf_dir={no_weights}"],
     "init.hf_dir: {no_weights}/model.safetensors: weights file missing"),
    # 3. --max-length past the position table is refused upfront; NaN embeddings stop cleanly
    ("eval-max-length-over-positions", "bepa-eval", ["--hf-dir", "{hf}", "--max-length", "65"],
     "--max-length 65 exceeds the 64 tokens {hf} can take (max_position_embeddings=64)"),
    ("eval-non-finite-embeddings", "bepa-eval", ["--hf-dir", "{nan_weights}"],
     "16 of 16 cls embeddings of parallel (de) are not finite (NaN/Inf)"),
    # 4. a tokenizer that is not one
    ("eval-tokenizer-not-sentencepiece", "bepa-eval",
     ["--hf-dir", "{hf}", "--tokenizer", "{not_spm}"], "{not_spm}: not a sentencepiece model"),
    ("eval-workdir-tokenizer-not-sentencepiece", "bepa-eval",
     ["--workdir", "{workdir}", "--tokenizer", "{not_spm}"],
     "{not_spm}: not a sentencepiece model"),
    ("eval-tokenizer-broken-hf-dir", "bepa-eval",
     ["--hf-dir", "{hf}", "--tokenizer", "{bad_hf_tok}"], "{bad_hf_tok}: "),
    # 5. an override of the wrong type names the key and the type it expects
    ("train-rules-not-pairs", "bepa-train", ["--config.mesh.rules=foo"],
     "mesh.rules entry 'foo' is not a (logical axis, mesh axes) pair: mesh.rules must be a tuple"),
    ("train-rules-type-error", "old-tuple-parser", ["--config.mesh.rules=foo"],
     "--config.mesh.rules=foo: config key mesh.rules expects a tuple, got 'foo'"),
    ("train-int-key", "bepa-train", ["--config.train.steps=abc"],
     "--config.train.steps=abc: config key train.steps expects an int, got 'abc'"),
    ("train-whole-section", "bepa-train", ["--config.train={{'steps': 1}}"],
     "--config.train is a section, not a value"),
    # 6. every grid point is parsed and validated before the first run
    ("sweep-grid-bad-type", "bepa-sweep", ["--grid", "train.global_batch=8,abc"],
     "--grid train.global_batch=8,abc: config key train.global_batch expects an int, got 'abc'"),
    ("sweep-set-bad-type", "bepa-sweep", ["--grid", "train.global_batch=8,16",
                                          "--set", "train.steps=ten"],
     "--set train.steps=ten: config key train.steps expects an int, got 'ten'"),
    ("sweep-grid-invalid-point", "bepa-sweep", ["--grid", "train.global_batch=8,12"],
     "run global_batch-12 (train.global_batch=12): train.global_batch=12 (micro-batch 12) is "
     "not divisible by the 8 batch shards"),
    ("sweep-grid-tiny-temperature", "bepa-sweep", ["--grid", "loss.temperature=0.07,1e-40"],
     "run temperature-1e-40 (loss.temperature=1e-40): loss.temperature=1e-40 is below 0.001"),
    # 7. a temperature whose logits cos/tau overflow is a config error, not a learning rate one
    ("train-tiny-temperature", "bepa-train", ["--config.loss.temperature=1e-40"],
     "loss.temperature=1e-40 is below 0.001: the logits cos/tau would reach +-1e+40"),
    ("train-nan-temperature", "bepa-train", ["--config.loss.temperature=nan"],
     "loss.temperature must be a finite number, got nan"),
    # 8. a weight dimension the mesh splits must divide by it (XLM-R's vocabulary by tensor=4)
    ("train-vocab-over-tensor", "bepa-train",
     ["--config.mesh.tensor=2", "--config.model.vocab_size=1001"],
     "model.vocab_size=1001 is not divisible by mesh.tensor=2 (mesh.rules splits 'vocab' over "
     "tensor)"),
]


def _snapshot(root):
  """(path, size, mtime) of every file under root: what 'nothing saved changed' compares."""
  return sorted((os.path.join(d, f), os.path.getsize(os.path.join(d, f)),
                 os.stat(os.path.join(d, f)).st_mtime_ns)
                for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize("case, prog, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(models, tmp_path, case, prog, args, expected):
  args = [a.format(**models) for a in args]
  expected = expected.format(**models)
  out, wd = tmp_path / "out", tmp_path / "wd"
  if prog == "bepa-eval":
    args += ["--parallel", models["test_de"], models["test_en"], "--out", str(out)]
  elif prog == "bepa-sweep":
    args += ["--config", os.path.join(REPO, "configs", "quickstart.py"), "--out", str(out)]
  else:  # a workdir with a saved file: it must stay as it was
    wd.mkdir()
    (wd / "config.json").write_text("saved\n")
    args += ["--workdir", str(wd)]
  if prog == "old-tuple-parser":
    prog, cmd = "bepa-train", [sys.executable, "-c", OLD_TUPLE_PARSER, *args]
  else:
    cmd = [sys.executable, "-m", MODULES[prog], *args]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=8", TOKENIZERS_PARALLELISM="false")
  before = _snapshot(models["root"])
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), r.stderr[-3000:]
  assert expected in errors[0], errors[0]
  assert _snapshot(models["root"]) == before  # no model, workdir or tokenizer was touched
  assert not out.exists()
  if wd.exists():
    assert os.listdir(wd) == ["config.json"] and (wd / "config.json").read_text() == "saved\n"
