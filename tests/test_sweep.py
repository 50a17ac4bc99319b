"""`bepa-sweep` on a 2x2 grid of 3-step runs of a tiny model: table, plots, resume, pod commands.

Each run is a real `python -m bepa_jax.cli.train` process evaluated on held-out bundled-corpus rows;
they share one tokenizer (trained once here) so that the four runs stay short.
"""
import csv
import os
import shlex

import pytest

from bepa_jax import sweep as sweep_lib
from bepa_jax.cli import sweep
from bepa_jax.data import corpus as corpus_lib
from bepa_jax.data import tokenizer as tokenizer_lib
from tests.conftest import REPO

CONFIG = os.path.join(REPO, "configs", "quickstart.py")
GRID = ["--grid", "train.global_batch=16,32", "--grid", "loss.negatives=global,local"]
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2",
        "model.intermediate_size=64", "data.max_length=16", "train.steps=3",
        "tokenizer.vocab_size=300", "data.languages=en,de", "checkpoint.async_save=False"]


def _sets(pairs):
  return [a for kv in pairs for a in ("--set", kv)]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  root = tmp_path_factory.mktemp("sweep")
  corpus = corpus_lib.load_embedded().select(["en", "de"])
  tok_dir = str(root / "tok")
  tokenizer_lib.train_sentencepiece(corpus.texts(), tok_dir, 300, "unigram")
  out = str(root / "out")
  argv = ["--config", CONFIG, *GRID, *_sets(TINY + [f"tokenizer.path={tok_dir}/spm.model"]),
          "--out", out, "--heldout", "24", "--eval-langs", "en,de"]
  rc = sweep.main(argv)
  return dict(out=out, argv=argv, rc=rc)


def _rows(out):
  with open(os.path.join(out, "sweep.csv")) as f:
    return list(csv.DictReader(f))


def test_grid_runs_are_trained_evaluated_and_tabulated(swept):
  assert swept["rc"] == 0
  out = swept["out"]
  rows = _rows(out)
  assert len(rows) == 4
  assert list(rows[0])[:4] == ["name", "train.global_batch", "loss.negatives", "status"]
  for col in ("retrieval_acc", "effective_rank", "pc1_share", "inbatch_acc", "loss"):
    assert col in rows[0]
  assert [(r["train.global_batch"], r["loss.negatives"]) for r in rows] == [
      ("16", "global"), ("16", "local"), ("32", "global"), ("32", "local")]
  for r in rows:
    assert r["status"] == "ok"
    assert 0.0 <= float(r["retrieval_acc"]) <= 1.0
    assert 1.0 <= float(r["effective_rank"]) <= 32.0
    assert 0.0 < float(r["pc1_share"]) <= 1.0
    wd = os.path.join(out, "runs", r["name"])
    assert os.path.isfile(os.path.join(wd, sweep_lib.RESULT))
    cmd = open(os.path.join(wd, "train.log")).readline()
    assert f"--config.train.global_batch={r['train.global_batch']}" in cmd
    assert f"--config.loss.negatives={r['loss.negatives']}" in cmd
  # In-batch accuracy is over each run's own pool: 2 rows per device with local negatives at
  # batch 16 on 8 devices, so chance is 1/2 there and 1/16 with global negatives.
  table = open(os.path.join(out, "sweep.md")).read().splitlines()
  assert table[0].startswith("| train.global_batch | loss.negatives |")
  assert len([l for l in table if l.startswith("| 16 ") or l.startswith("| 32 ")]) == 4
  for name in ("sweep.json", "sweep_retrieval_acc.png", "sweep_effective_rank.png",
               "sweep_pc1_share.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0


def test_rerun_skips_finished_runs(swept, capsys):
  out = swept["out"]
  logs = [os.path.join(out, "runs", r["name"], "train.log") for r in _rows(out)]
  before = [os.stat(p).st_mtime_ns for p in logs]
  assert sweep.main(swept["argv"]) == 0
  assert [os.stat(p).st_mtime_ns for p in logs] == before
  assert len(_rows(out)) == 4


def test_print_backend_prints_one_pod_command_per_run(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  rc = sweep.main(["--config", "configs/quickstart.py", *GRID, "--set", "train.steps=50",
                   "--out", str(tmp_path), "--backend", "print", "--tpu-name", "bepa",
                   "--zone", "us-central2-b", "--accelerator-type", "v4-32",
                   "--gcs-root", "gs://bucket/sweep"])
  assert rc == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 4
  for line, (batch, neg) in zip(lines, [(16, "global"), (16, "local"), (32, "global"),
                                        (32, "local")]):
    argv = shlex.split(line)
    assert argv[:2] == ["python", "launch/tpu.py"] and "train" in argv
    assert f"--config.train.global_batch={batch}" in argv
    assert f"--config.loss.negatives={neg}" in argv
    assert "--config.train.steps=50" in argv
    assert argv[argv.index("--workdir") + 1] == (
        f"gs://bucket/sweep/runs/global_batch-{batch}_negatives-{neg}")
  assert not os.listdir(tmp_path)  # nothing ran


@pytest.mark.parametrize("grid, message", [
    ("train.global_batch", "expected KEY=VALUE"),
    ("train.global_batch=", "empty value list"),
    ("train.global_batch=16,,32", "empty value list"),
    ("train.global_bach=16,32", "unknown config key 'train.global_bach'"),
])
def test_bad_grid_is_one_line_exit_2(grid, message, capsys, tmp_path):
  rc = sweep.main(["--config", CONFIG, "--grid", grid, "--out", str(tmp_path)])
  assert rc == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert err.startswith("bepa-sweep: error:") and message in err


@pytest.mark.parametrize("keys", [["loss.temperature"],
                                  ["loss.negatives", "train.global_batch", "loss.margin"]])
def test_tables_and_plots_for_one_or_three_axes(keys, tmp_path):
  values = {"loss.temperature": ["0.02", "0.07"], "loss.negatives": ["global", "local"],
            "train.global_batch": ["16", "64"], "loss.margin": ["0.0", "0.3"]}
  points = sweep_lib.expand_grid([(k, values[k]) for k in keys])
  rows = [{"name": sweep_lib.run_name(p), **p, "status": "ok", "retrieval_acc": 0.1 * i,
           "effective_rank": 2.0 + i, "pc1_share": 0.5, "gap": 0.1, "inbatch_acc": 0.5,
           "loss": 1.0, "contrastive_loss": 0.5, "train_s": 3.0} for i, p in enumerate(points)]
  rows[-1] = {**rows[-1], "status": "failed (exit 1)"}
  sweep_lib.write_tables(str(tmp_path), keys, rows, {"note": ""})
  paths = sweep_lib.write_plots(str(tmp_path), keys, rows)
  assert sorted(os.path.basename(p) for p in paths) == [
      "sweep_effective_rank.png", "sweep_pc1_share.png", "sweep_retrieval_acc.png"]
  table = open(tmp_path / "sweep.md").read()
  assert table.count("\n| ") == len(points) and "failed (exit 1)" in table
  assert len(_rows(str(tmp_path))) == len(points)
