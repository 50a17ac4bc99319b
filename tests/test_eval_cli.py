"""`bepa-eval` end to end on a tiny trained model, and periodic evaluation inside bepa-train.

One tiny run (10 steps, eval every 5) gives a workdir with a checkpoint; the same params are
exported as an HF directory; `bepa-eval --compare WORKDIR HFDIR` must score them identically.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from bepa_jax.trainer import loop
from bepa_jax.hf import convert as hf
from bepa_jax.data import corpus as corpus_lib
from bepa_jax.data.tokenizer import SentencePieceTokenizer
from bepa_jax.cli import eval as cli
from bepa_jax.eval import embed
from bepa_jax.model import EncoderConfig
from tests.conftest import REPO
from tests.helpers import tiny_config


def _write_lines(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    f.write("".join(l + "\n" for l in lines))
  return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  corpus = corpus_lib.load_embedded()
  rows = corpus.rows[:40]
  col = lambda lang: [r[corpus.languages.index(lang)] for r in rows]
  tatoeba = root / "tatoeba"
  tatoeba.mkdir()
  for lang3, lang2 in (("deu", "de"), ("fra", "fr")):
    _write_lines(tatoeba / f"tatoeba.{lang3}-eng.{lang3}", col(lang2))
    _write_lines(tatoeba / f"tatoeba.{lang3}-eng.eng", col("en"))
  parallel = [_write_lines(root / f"test.{l}", col(l)) for l in ("de", "en", "fr")]

  config = tiny_config(**{"eval.every_steps": 5, "eval.parallel": ",".join(parallel[:2]),
                          "eval.max_sentences": 32, "checkpoint.every_steps": 10})
  workdir = str(root / "wd")
  state, _ = loop.train(config, workdir)
  hf_dir = str(root / "hf")
  params = jax.device_get(embed.encoder_params(state.params))
  tok_path = os.path.join(workdir, "tokenizer", "spm.model")
  cfg = EncoderConfig.from_config(config.model,
                                  vocab_size=SentencePieceTokenizer(tok_path).vocab_size)
  hf.save_hf(hf_dir, params, cfg)
  shutil.copy(tok_path, os.path.join(hf_dir, "spm.model"))
  return dict(root=root, workdir=workdir, hf_dir=hf_dir, tatoeba=str(tatoeba), parallel=parallel)


def test_periodic_eval_is_logged_with_the_training_metrics(run):
  with open(os.path.join(run["workdir"], "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f]
  evals = [r for r in records if any(k.startswith("eval/") for k in r)]
  assert [r["step"] for r in evals] == [5, 10]
  for r in evals:
    acc = r["eval/retrieval/parallel/de-en/cls/de_to_en"]
    assert 0.0 <= acc <= 1.0
    assert r["eval/diagnostics/cls/effective_rank"] > 0
    assert "eval/retrieval/parallel/de-en/mean/en_to_de" in r
  assert any("train/loss" in r for r in records)


def test_compare_workdir_and_hf_export_of_the_same_params(run, tmp_path):
  out = tmp_path / "out"
  rc = cli.main(["--compare", run["workdir"], run["hf_dir"], "--tatoeba", run["tatoeba"],
                 "--langs", "deu,fra", "--parallel", *run["parallel"], "--margin", "ratio",
                 "--max-length", "16", "--out", str(out), "--map-per-lang", "20"])
  assert rc == 0
  for name in ("report.json", "summary.md", "spectrum.png", "map.png", "similarity_hist.png"):
    assert (out / name).stat().st_size > 100, name
  report = json.loads((out / "report.json").read_text())
  (a, ra), (b, rb) = report["models"].items()
  assert (a, b) == ("wd", "hf")
  ta, tb = ra["retrieval"]["tatoeba"], rb["retrieval"]["tatoeba"]
  assert set(ta) == {"deu", "fra"}
  for scoring in ("cls", "mean", "cls+ratio", "mean+ratio"):
    for d in ("deu->eng", "eng->deu"):
      assert ta["deu"]["deu-eng"][scoring][d] == pytest.approx(tb["deu"]["deu-eng"][scoring][d])
      assert 0.0 <= ta["deu"]["deu-eng"][scoring][d] <= 1.0
  assert set(ra["retrieval"]["parallel"]) == {"de-en", "de-fr", "en-fr"}
  for key in ("effective_rank", "pc1_share", "alignment", "uniformity", "gap"):
    assert ra["diagnostics"]["cls"][key] == pytest.approx(rb["diagnostics"]["cls"][key],
                                                          rel=1e-4, abs=1e-5)
  assert np.isfinite(ra["diagnostics"]["mean"]["effective_rank"])
  md = (out / "summary.md").read_text()
  assert "| | wd | hf |" in md and "tatoeba average xx->eng (cls+ratio)" in md


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "bepa_jax.cli.eval", *args], capture_output=True,
                        text=True, env=env, timeout=120, cwd=REPO)


def test_missing_file_is_a_one_line_error(run, tmp_path):
  r = _cli("--hf-dir", run["hf_dir"], "--parallel", run["parallel"][0], str(tmp_path / "no.en"))
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("bepa-eval: error:") and "no.en" in lines[0]


def test_nothing_to_evaluate_is_a_usage_error(run):
  r = _cli("--hf-dir", run["hf_dir"])
  assert r.returncode == 2 and "bepa-eval: error: nothing to evaluate" in r.stderr
