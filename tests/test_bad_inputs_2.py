"""Reliability suite, round two (issue 28): relative paths, and bad or suspect input found by a
fresh campaign, through the real commands as subprocesses.

Bad input: exit 2, exactly one `PROG: error: ...` line naming the problem, no traceback, and
nothing already saved changed (a bepa-train refusal leaves its workdir as it was: no tokenizer
trained, no config.json written). Valid but suspect input: the run goes on, with one warning line
counting what was affected.
"""
import codecs
import gzip
import json
import os
import random
import shutil
import socket
import subprocess
import sys

import pytest

from bepa_jax.data import corpus as corpus_lib
from bepa_jax.workdir_lock import LOCK_NAME
from tests.conftest import REPO

MODULES = {"bepa-train": "bepa_jax.cli.train", "bepa-eval": "bepa_jax.cli.eval",
           "bepa-export": "bepa_jax.cli.export", "bepa-tokenizer": "bepa_jax.cli.tokenizer",
           "bepa-transfer": "bepa_jax.cli.transfer", "bepa-ckpt": "bepa_jax.cli.ckpt"}
TINY = {"model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 4,
        "model.intermediate_size": 64, "model.hidden_dropout": 0.0,
        "model.attention_dropout": 0.0, "data.max_length": 16, "data.max_predictions_per_seq": 3,
        "data.packing": False, "tokenizer.vocab_size": 400, "train.global_batch": 16,
        "train.log_every": 1, "optim.warmup_steps": 0, "optim.schedule": "constant",
        "checkpoint.every_steps": 2, "checkpoint.every_minutes": 0, "checkpoint.async_save": False}


def _env(**extra):
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
              XLA_FLAGS="--xla_force_host_platform_device_count=8",
              TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", **extra)


def _run(prog, *args, cwd=REPO, env=None):
  return subprocess.run([sys.executable, "-m", MODULES[prog], *map(str, args)],
                        capture_output=True, text=True, env=_env(**(env or {})), cwd=cwd,
                        timeout=600)


def _train(workdir, cwd=REPO, env=None, **overrides):
  cfg = {**TINY, **overrides}
  return _run("bepa-train", "--workdir", workdir,
              *[f"--config.{k}={v}" for k, v in cfg.items()], cwd=cwd, env=env)


def _one_error(r, prog, expected):
  """Exit 2, one error line `PROG: error: ...` holding `expected`, no traceback."""
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if "error" in l.lower()]
  assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), r.stderr[-3000:]
  assert expected in errors[0], errors[0]
  assert "move them away" not in r.stderr


def _snapshot(root):
  """(path, size, mtime) of every file under root: what 'nothing saved changed' compares (the
  workdir lock aside: each run on a workdir takes it)."""
  return sorted((os.path.join(d, f), os.path.getsize(os.path.join(d, f)),
                 os.stat(os.path.join(d, f)).st_mtime_ns)
                for d, _, files in os.walk(root) for f in files if f != LOCK_NAME)


def _column(lang, n=120):
  corpus = corpus_lib.load_embedded()
  return [r[corpus.languages.index(lang)] for r in corpus.rows[:n]]


def _lines(texts):
  return "".join(t + "\n" for t in texts)


def _with_nul(texts, every=10):
  """Every `every`-th line with a NUL byte inside it."""
  return [t[:3] + "\x00" + t[3:] if i % every == 0 else t for i, t in enumerate(texts)]


def _unseen(n):
  """n sentences in a script none of the embedded corpus's languages uses (Devanagari): a
  tokenizer trained on that corpus reads them as [UNK]."""
  rng = random.Random(0)
  letters = [chr(c) for c in range(0x915, 0x939)]
  return [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 6)))
                   for _ in range(rng.randint(3, 8))) for _ in range(n)]


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _span_rows(n, unusable):
  """SQuAD-style records; the first `unusable` with answer_start past the context."""
  rows = []
  for i in range(n):
    c = ("red", "blue", "green")[i % 3]
    ctx = f"the cat is {c} and sat on the mat."
    start = ctx.index(c) + (100 if i < unusable else 0)
    rows.append({"id": f"q{i}", "question": "what colour is the cat?", "context": ctx,
                 "answers": {"text": [c], "answer_start": [start]}})
  return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Data files, good and bad: aligned en/de (and hi, a language no tokenizer here saw), a
  corrupt .gz, a UTF-16 file, a TSV whose header starts with a UTF-8 BOM (and whose en cells
  hold NUL bytes every 10th row), en/de with NUL bytes, a Tatoeba dir where fra has no .eng
  side."""
  root = tmp_path_factory.mktemp("bad_inputs_2_files")
  en, de = _lines(_column("en")), _lines(_column("de"))
  (root / "tab.en").write_text(en, encoding="utf-8")
  (root / "tab.de").write_text(de, encoding="utf-8")
  (root / "tab.hi").write_text(_lines(_unseen(120)), encoding="utf-8")
  (root / "nul.en").write_text(_lines(_with_nul(_column("en"))), encoding="utf-8")
  (root / "nul.de").write_text(de, encoding="utf-8")
  (root / "corrupt.en").write_text(en, encoding="utf-8")
  good = bytearray(gzip.compress(de.encode()))
  good[len(good) // 2: len(good) // 2 + 16] = b"\xff" * 16  # corrupt, not truncated
  (root / "corrupt.de.gz").write_bytes(bytes(good))
  (root / "u16.en").write_text(en, encoding="utf-8")
  (root / "u16.de").write_bytes(codecs.BOM_UTF16_LE + de.encode("utf-16-le"))
  rows = "".join(f"{a}\t{b}\n" for a, b in zip(_with_nul(_column("en", 340)),
                                                _column("de", 340)))
  (root / "bom.tsv").write_bytes(codecs.BOM_UTF8 + ("en\tde\n" + rows).encode())
  tat = root / "tatoeba"
  tat.mkdir()
  (tat / "tatoeba.deu-eng.deu").write_text(_lines(_column("de", 340)), encoding="utf-8")
  (tat / "tatoeba.deu-eng.eng").write_text(_lines(_column("en", 340)), encoding="utf-8")
  (tat / "tatoeba.fra-eng.fra").write_text(_lines(_column("fr", 340)), encoding="utf-8")
  return {"root": str(root), "tatoeba": str(tat)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run trained by the real bepa-train with a relative --workdir (cwd = its root), to
  step 2: what the README's commands do."""
  root = tmp_path_factory.mktemp("bad_inputs_2_runs")
  r = _train("runs/rel", cwd=root, **{"train.steps": 2})
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(root / "runs" / "rel" / "checkpoints")) == ["2"]
  return root


def _copy(trained, name):
  shutil.copytree(trained / "runs" / "rel", trained / "runs" / name)
  return trained / "runs" / name


# ----------------------------------------------------------------------------- bad input
# (case, bepa-train overrides, what the one error line must contain); {name} = a path of `files`
TRAIN_CASES = [
    ("weight-dot", {"data.source": "aligned:{root}/tab.{{en,de}}@."},
     "data.source entry 'aligned:{root}/tab.{{en,de}}@.': weight '.' is not a number"),
    ("weight-infinite", {"data.source": "aligned:{root}/tab.{{en,de}}@1e400"},
     "weight '1e400' must be a finite number > 0"),
    ("weight-not-a-number", {"data.source": "aligned:{root}/tab.{{en,de}}@abc"},
     "data.source entry 'aligned:{root}/tab.{{en,de}}@abc': weight 'abc' is not a number"),
    ("negative-data-seed", {"data.seed": -1}, "data.seed must be >= 0, got -1"),
    ("nan-learning-rate", {"optim.learning_rate": "nan"},
     "optim.learning_rate must be a finite number > 0, got nan"),
    ("keep-best-metric-typo", {"checkpoint.keep_best_metric": "lsos", "checkpoint.keep": 1},
     "checkpoint.keep_best_metric='lsos' is not a metric the trainer saves (did you mean 'loss'?)"),
    ("corrupt-gz", {"data.source": "aligned:{root}/corrupt.{{en,de}}"},
     "{root}/corrupt.de.gz: cannot read: Error -3 while decompressing data"),
    ("unknown-pair-among-known", {"data.pairs": "en-de,en-fr,en-xx"},
     "data.pairs: en-xx in none of the sources"),
    ("utf16-beside-utf8", {"data.source": "aligned:{root}/u16.{{en,de}}"},
     "{root}/u16.de: UTF-16 text (byte-order mark FF FE), not UTF-8"),
    ("tatoeba-listed-without-eng", {"data.source": "tatoeba:{tatoeba}:fra"},
     "no tatoeba files for fra ({tatoeba}/tatoeba.fra-eng.fra has no tatoeba.fra-eng.eng "
     "beside it)"),
]


@pytest.mark.parametrize("case, overrides, expected", TRAIN_CASES,
                         ids=[c[0] for c in TRAIN_CASES])
def test_bad_train_input_is_refused_before_anything_is_built(files, tmp_path, case, overrides,
                                                              expected):
  overrides = {k: str(v).format(**files) for k, v in overrides.items()}
  expected = expected.format(**files)
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "config.json").write_text("saved\n")
  before = _snapshot(files["root"])
  r = _train(wd, **{"train.steps": 2, **overrides})
  _one_error(r, "bepa-train", expected)
  # refused in the validation pass or when the sources are opened: no tokenizer trained,
  # config.json not rewritten, no file changed
  assert os.listdir(wd) == ["config.json"] and (wd / "config.json").read_text() == "saved\n"
  assert _snapshot(files["root"]) == before


def test_corrupt_gz_in_eval_and_tokenizer(files, trained, tmp_path):
  root = files["root"]
  r = _run("bepa-eval", "--workdir", trained / "runs" / "rel", "--parallel",
           f"{root}/corrupt.de.gz", f"{root}/corrupt.en", "--out", tmp_path / "ev")
  _one_error(r, "bepa-eval", f"{root}/corrupt.de.gz: cannot read as UTF-8 text (")
  assert not (tmp_path / "ev").exists()
  r = _run("bepa-tokenizer", "train", "--input", f"aligned:{root}/corrupt.{{en,de}}",
           "--vocab-size", 100, "--out", tmp_path / "tok")
  _one_error(r, "bepa-tokenizer", f"{root}/corrupt.de.gz: cannot read: Error -3")
  assert not (tmp_path / "tok" / "spm.model").exists()


def test_utf16_file_in_eval_names_the_encoding(files, trained, tmp_path):
  root = files["root"]
  r = _run("bepa-eval", "--workdir", trained / "runs" / "rel", "--parallel",
           f"{root}/u16.de", f"{root}/u16.en", "--out", tmp_path / "ev")
  _one_error(r, "bepa-eval", f"{root}/u16.de: UTF-16 text (byte-order mark FF FE)")


def test_steps_below_the_restored_step_trains_nothing_and_says_so(trained):
  wd = _copy(trained, "below")
  before = _snapshot(wd)
  r = _train(wd, **{"train.steps": 1})
  _one_error(r, "bepa-train", "train.steps=1 is below the restored step 2 (checkpoints in "
             f"{wd}/checkpoints): nothing to train")
  assert _snapshot(wd) == before


def test_changed_tokenizer_is_named_not_called_damage(trained, tmp_path):
  from bepa_jax.data import tokenizer as tokenizer_lib
  wd = _copy(trained, "tok")
  tokenizer_lib.train_sentencepiece(iter(_column("en", 340) + _column("fr", 340)),
                                    str(tmp_path / "other"), 200, "unigram")
  spm = wd / "tokenizer" / "spm.model"
  shutil.copyfile(tmp_path / "other" / "spm.model", spm)
  other = tokenizer_lib.SentencePieceTokenizer(str(spm)).vocab_size
  before = _snapshot(wd)
  r = _train(wd, **{"train.steps": 4})
  _one_error(r, "bepa-train", f"the tokenizer {spm} ({other} pieces) does not match the "
             f"checkpoints in {wd}/checkpoints, trained with a ")
  assert "nothing was changed" in r.stderr and "damaged" not in r.stderr
  assert _snapshot(wd) == before  # nothing deleted, moved or rewritten (config.json neither)


def test_export_to_an_existing_file_is_refused_before_the_export(trained):
  out = trained / "a_file"
  out.write_text("keep me\n")
  r = _run("bepa-export", "--workdir", "runs/rel", "--out", "a_file", cwd=trained)
  _one_error(r, "bepa-export", f"{out}: exists and is not a directory; refusing to overwrite")
  assert out.read_text() == "keep me\n"
  assert not os.path.exists(f"{out}.tmp-export")


# ----------------------------------------------------------------------------- valid input
def test_relative_workdir_trains_saves_resumes_evaluates_and_exports(files, trained):
  """The README's commands with relative paths (cwd = the runs' root): train, resume, eval,
  export."""
  shutil.copytree(trained / "runs" / "rel", trained / "runs" / "rel2")
  r = _train("runs/rel2", cwd=trained, **{"train.steps": 4})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from checkpoint step 2" in r.stderr
  assert sorted(os.listdir(trained / "runs" / "rel2" / "checkpoints")) == ["2", "4"]
  shutil.copy(os.path.join(files["root"], "tab.de"), trained / "test.de")
  shutil.copy(os.path.join(files["root"], "tab.en"), trained / "test.en")
  r = _run("bepa-eval", "--workdir", "runs/rel2", "--parallel", "test.de", "test.en",
           "--out", "ev", "--max-sentences", 32, "--no-tsne", cwd=trained)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (trained / "ev" / "report.json").exists()
  r = _run("bepa-export", "--workdir", "runs/rel2", "--out", "hf", cwd=trained)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (trained / "hf" / "model.safetensors").exists()


def test_bom_header_nul_bytes_and_tatoeba_language_without_eng(files, tmp_path):
  """A TSV header with a UTF-8 BOM reads `en` (not `\\ufeffen`); NUL bytes inside its lines are
  dropped, the lines counted in one warning line and in the data report (not "nothing
  skipped"); a Tatoeba language without its .eng file is skipped with one warning line counting
  it; the run trains."""
  r = _train(tmp_path / "wd", **{
      "train.steps": 1, "data.source": f"tsv:{files['root']}/bom.tsv;tatoeba:{files['tatoeba']}",
      "data.pairs": "en-de,deu-eng", "tokenizer.vocab_size": 200})
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [l for l in r.stderr.splitlines() if "WARNING" in l and "tatoeba" in l]
  assert len(warnings) == 1, r.stderr[-3000:]
  assert f"{files['tatoeba']}: 1 language(s) without their tatoeba.xxx-eng.eng file skipped: " \
         "fra" in warnings[0]
  assert "\ufeff" not in r.stderr
  nul = [l for l in r.stderr.splitlines() if "NUL" in l and "WARNING" in l]
  assert len(nul) == 1, r.stderr[-3000:]
  assert f"{files['root']}/bom.tsv: 34 line(s) hold NUL bytes: the NULs are dropped from the " \
         "text" in nul[0]
  data = [l for l in r.stderr.splitlines() if " INFO data: " in l]  # the load report
  assert len(data) == 1 and data[0].endswith("; 34 lines cleared of NUL bytes"), data


def test_tokenizer_drops_nul_bytes_and_counts_the_lines(files, tmp_path):
  root = files["root"]
  r = _run("bepa-tokenizer", "train", "--input", f"aligned:{root}/nul.{{en,de}}",
           "--vocab-size", 100, "--out", tmp_path / "tok")
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [l for l in r.stderr.splitlines() if "NUL" in l]
  assert len(warnings) == 1 and "WARNING" in warnings[0], r.stderr
  assert f"{root}/nul.en: 12 line(s) hold NUL bytes: the NULs are dropped" in warnings[0]
  assert "12 lines cleared of NUL bytes" in r.stdout and "nothing skipped" not in r.stdout


def test_eval_on_a_language_the_tokenizer_never_saw_warns_once(files, trained, tmp_path):
  """Scores are still printed, with one warning line counting the [UNK] tokens and the
  sentences reduced to unknown pieces of the unseen language (and of it only)."""
  root = files["root"]
  r = _run("bepa-eval", "--workdir", trained / "runs" / "rel", "--parallel", f"{root}/tab.en",
           f"{root}/tab.hi", "--out", tmp_path / "ev", "--max-sentences", 32, "--no-tsne")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "| parallel en->hi (cls) |" in r.stdout   # the scores, printed
  warnings = [l for l in r.stderr.splitlines() if "[UNK]" in l]
  assert len(warnings) == 1 and "WARNING" in warnings[0], r.stderr[-3000:]
  assert "% of tokens are [UNK] (32 of 32 sentences reduced to unknown pieces): the tokenizer " \
         "never saw this language, so its scores say little" in warnings[0]
  assert ": hi: " in warnings[0] and " en: " not in warnings[0]


def test_transfer_skips_answers_outside_their_context_and_counts_them(trained, tmp_path):
  """Some answers past their context: one warning line counting them (file named), the run
  trains on the others; every answer unusable: one line, exit 2, before any fine-tuning."""
  ev = _jsonl(tmp_path / "en.jsonl", _span_rows(6, 0))
  common = ["--workdir", trained / "runs" / "rel", "--task", "mlqa", "--eval-jsonl",
            f"en={ev}", "--steps", 1, "--batch-size", 8, "--max-length", 32]
  some = _jsonl(tmp_path / "some.jsonl", _span_rows(8, 3))
  r = _run("bepa-transfer", *common, "--train-jsonl", some, "--out", tmp_path / "some")
  assert r.returncode == 0, r.stderr[-3000:]
  warnings = [l for l in r.stderr.splitlines() if "WARNING" in l]
  assert len(warnings) == 1, r.stderr[-3000:]
  assert f"{some}: 3 of 8 training answers lie outside their context (answer_start past it): " \
         "those records are skipped" in warnings[0]
  assert json.loads((tmp_path / "some" / "mlqa.json").read_text())["results"]["en"]["count"] == 6
  none = _jsonl(tmp_path / "none.jsonl", _span_rows(8, 8))
  r = _run("bepa-transfer", *common, "--train-jsonl", none, "--out", tmp_path / "none")
  _one_error(r, "bepa-transfer", f"{none}: none of the 8 training answers lies within its "
             "context (answer_start past the context): nothing to train on")
  assert not (tmp_path / "none").exists()


def test_transfer_xnli_label_names_and_an_unknown_label(trained, tmp_path):
  """XNLI's label names (entailment / neutral / contradiction, as HF's xnli) are read as
  0 / 1 / 2; an unknown one is one line naming the file, its line and the label."""
  from bepa_jax.finetune import tasks
  rows = [{"premise": "a cat", "hypothesis": "an animal", "label": name}
          for name in ("entailment", "Neutral", "contradiction", 2, "1")]
  good = _jsonl(tmp_path / "good.jsonl", rows)
  task = tasks.get_task("xnli", train_jsonl=good, eval_jsonl={"de": good})
  assert [r["label"] for r in task.train()] == [0, 1, 2, 2, 1]
  bad = tmp_path / "bad.jsonl"
  bad.write_text(open(good).read().replace('"Neutral"', '"maybe"').replace("\n", "\n\n", 1))
  r = _run("bepa-transfer", "--workdir", trained / "runs" / "rel", "--task", "xnli",
           "--train-jsonl", bad, "--eval-jsonl", f"de={good}", "--steps", 1, "--max-length", 32,
           "--out", tmp_path / "out")
  _one_error(r, "bepa-transfer", f"{bad}:3: label 'maybe' is not a class number or one of "
             "entailment, neutral, contradiction")
  assert "invalid literal" not in r.stderr and not (tmp_path / "out").exists()


def test_busy_coordinator_port_is_named_by_the_launcher_and_by_process_0(tmp_path, capsys):
  """A coordinator port in use: the launcher refuses before starting a worker, and process 0
  of a job (here bepa-train) says so, naming host:port and where to pick another; never
  gRPC's "Failed to add port" crash."""
  from launch import local
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    rc = local.main(["--port", str(port), "--log_dir", str(tmp_path / "logs"), "--",
                     sys.executable, "-c", "pass"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0] == (
        f"launch/local.py: error: coordinator port 127.0.0.1:{port} is in use (Address already "
        "in use): pick another with --port, or leave --port out for a free one")
    assert not (tmp_path / "logs").exists()  # no worker started
    r = _train(tmp_path / "wd", env={"BEPA_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                     "BEPA_NUM_PROCESSES": "2", "BEPA_PROCESS_ID": "0"})
  _one_error(r, "bepa-train", f"coordinator port 127.0.0.1:{port} is in use (Address already "
             "in use): another job or an earlier run holds it; pick another port in "
             "BEPA_COORDINATOR_ADDRESS (or --coordinator_address)")
  assert "Failed to add port" not in r.stderr and not (tmp_path / "wd").exists()


def test_pickle_only_hf_dir_names_each_commands_own_flag(files, tmp_path):
  """bepa-ckpt import (bepa-train's config) names --config.init.allow_pickle=True; bepa-eval
  and bepa-transfer, which read no pickle, name the import that does."""
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text(json.dumps({
      "model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 400,
      "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
      "intermediate_size": 64}))
  (hf / "pytorch_model.bin").write_bytes(b"never read")
  head = f"'{hf}' has only pytorch_model.bin, a pickle that can run code; convert it to " \
         "model.safetensors or, if you trust it, "
  r = _run("bepa-ckpt", "import", hf, tmp_path / "wd")
  _one_error(r, "bepa-ckpt import", f"init.hf_dir: {head}pass --config.init.allow_pickle=True")
  assert not (tmp_path / "wd").exists()
  via_import = f"{head}import it: bepa-ckpt import {hf} WORKDIR " \
               "--config.init.allow_pickle=True, then use WORKDIR"
  r = _run("bepa-eval", "--hf-dir", hf, "--parallel", f"{files['root']}/tab.en",
           f"{files['root']}/tab.de", "--out", tmp_path / "ev")
  _one_error(r, "bepa-eval", via_import)
  r = _run("bepa-transfer", "--hf-dir", hf, "--task", "xnli", "--out", tmp_path / "tr")
  _one_error(r, "bepa-transfer", via_import)
