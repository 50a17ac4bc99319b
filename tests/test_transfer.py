"""Zero-shot transfer (bepa_jax.finetune): each task a few sharded steps on mocked TFDS data.

Data comes from `tfds.testing.mock_data` with hand-made records (random mock records have no
real language codes or consistent answers), so the toy tasks are learnable and checkable.
"""
import json
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from bepa_jax.hf import convert as hf
from bepa_jax.data import corpus as corpus_lib
from bepa_jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from bepa_jax import loading
from bepa_jax.cli import transfer as cli
from bepa_jax.finetune import features, tasks, trainer
from bepa_jax.finetune import report as report_lib
from bepa_jax.model import BepaEncoder, EncoderConfig
from bepa_jax import mesh as mesh_lib
from bepa_jax.config import defaults as default_config

L = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("transfer")
  corpus = corpus_lib.load_embedded()
  texts = [t for r in corpus.rows[:300] for t in r] + ["red blue green yellow the cat sat on mat"] * 20
  tok_path = train_sentencepiece(texts, str(root / "tok"), 300)
  tok = SentencePieceTokenizer(tok_path)
  cfg = EncoderConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position_embeddings=64, hidden_dropout=0.0,
                      attention_dropout=0.0)
  ex = np.zeros((1, L), np.int32)
  shapes = jax.eval_shape(lambda r: nn.meta.unbox(BepaEncoder(cfg).init(
      r, ex, mlm_positions=ex[:, :1]))["params"], jax.random.key(0))
  rng = np.random.default_rng(0)   # numpy init: compiling flax's init costs seconds here
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape, s.dtype) if path[-1].key == "scale" else
                       (0.02 * rng.standard_normal(s.shape)).astype(s.dtype)), shapes)
  hf_dir = root / "hf"
  hf.save_hf(str(hf_dir), params, cfg)
  shutil.copy(tok_path, hf_dir / "spm.model")
  mesh_cfg = default_config.get_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = -1, 2, 1
  loaded = loading.Loaded("tiny", cfg, params, tok, mesh_cfg, L)
  return dict(loaded=loaded, mesh=mesh_lib.create_mesh(mesh_cfg), mesh_cfg=mesh_cfg,
              hf_dir=str(hf_dir), root=root)


# ----------------------------------------------------------------------------- toy data
COLOURS = ("red", "blue", "green")


def nli_record(i, lang="en"):
  c = COLOURS[i % 3]  # the label is the colour word of the premise: trivially learnable
  return i % 3, f"{c} {c} {c} cat", "on the mat"


def mock_sources(builder, split, **kw):
  name = builder.name
  if name == "glue" and builder.builder_config.name == "stsb":
    # similarity 0 / 2.5 / 5 by the colour word: a learnable regression
    return [{"sentence1": nli_record(i)[1], "sentence2": "on the mat", "idx": i,
             "label": 2.5 * (i % 3)} for i in range(48)]
  if name in ("multi_nli", "glue"):
    out = []
    for i in range(64):
      label, p, h = nli_record(i)
      rec = ({"sentence": p, "label": label % 2, "idx": i} if name == "glue"
             else {"premise": p, "hypothesis": h, "label": label})
      out.append(rec)
    return out
  if name == "xnli":
    out = []
    for i in range(12):
      label, p, h = nli_record(i)
      langs = list(tasks.XNLI_LANGS)
      out.append({"premise": {l: p if l == "en" else f"{l} {p}" for l in langs}, "label": label,
                  "hypothesis": {"language": langs, "translation": [f"{l} {h}" for l in langs]}})
    return out
  if name in ("squad", "mlqa"):
    out = []
    for i in range(24):
      c = COLOURS[i % 3]
      ctx = f"the cat is {c} and sat on the mat."
      out.append({"id": f"q{i}", "title": "t", "question": "what colour is the cat?",
                  "context": ctx, "answers": {"text": [c], "answer_start": [ctx.index(c)]}})
    return out
  raise AssertionError(name)


@pytest.fixture
def mocked():
  with tfds.testing.mock_data(as_data_source_fn=mock_sources,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


# ----------------------------------------------------------------------------- features
def test_span_features_map_answers_both_ways(tiny):
  tok = tiny["loaded"].tokenizer
  assert features.split_words("Hi, 北京 ok") == [(0, 2), (2, 3), (4, 5), (5, 6), (7, 9)]
  ctx = "one two three four five six seven eight nine ten eleven twelve. The answer is here!"
  rec = {"question": "where?", "context": ctx, "answers": ["answer is here"],
         "answer_starts": [ctx.index("answer")]}
  arrays, windows = features.span_features([rec], tok, "bert", 24, doc_stride=6)
  assert len(windows) > 1                                     # the context needs several windows
  has = np.flatnonzero(arrays["start_positions"])
  assert len(has) >= 1 and (arrays["end_positions"][has] >= arrays["start_positions"][has]).all()
  # logits that point at the labels give back the gold text, from the context's characters
  W = len(windows)
  s, e = np.zeros((W, 24)), np.zeros((W, 24))
  w = has[0]
  s[w, arrays["start_positions"][w]] = e[w, arrays["end_positions"][w]] = 10.0
  assert features.best_spans(s, e, windows, arrays["example"], [rec]) == ["answer is here"]
  # pair layout: [CLS] q [SEP] ctx [SEP], token types 0 / 1
  ids, types = features.pack(tok, "bert", [7, 8], [9], 8)
  assert ids == [tok.cls_id, 7, 8, tok.sep_id, 9, tok.sep_id] and types == [0, 0, 0, 0, 1, 1]
  ids, types = features.pack(tok, "xlmr", [7, 8], [9], 8)
  assert ids == [tok.cls_id, 7, 8, tok.sep_id, tok.sep_id, 9, tok.sep_id] and set(types) == {0}


# ----------------------------------------------------------------------------- tasks
def _run(tiny, task, steps, **kw):
  kw.setdefault("lr", 1e-2)
  return trainer.run(task, tiny["loaded"], tiny["mesh"], tiny["mesh_cfg"], steps=steps,
                     batch_size=16, max_length=L, log_every=0, **kw)


def test_xnli_learns_and_reports_every_language(tiny, mocked):
  report = _run(tiny, tasks.get_task("xnli"), steps=50, lr=3e-3)
  losses = report["train"]["losses"]
  assert len(losses) == 50 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  assert set(report["results"]) == set(tasks.XNLI_LANGS)
  assert report["results"]["en"]["accuracy"] > 90.0   # learnt the toy task
  for r in report["results"].values():
    assert 0.0 <= r["accuracy"] <= 100.0 and r["count"] == 12
  md = report_lib.markdown(report)
  assert all(f"\n| {l} | " in md for l in tasks.XNLI_LANGS) and "**average**" in md


def test_mlqa_span_extraction(tiny, mocked):
  report = _run(tiny, tasks.get_task("mlqa", langs=["en", "de", "zh"]), steps=40)
  losses = report["train"]["losses"]
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
  assert list(report["results"]) == ["en", "de", "zh"] and report["metric"] == "f1"
  en = report["results"]["en"]
  assert en["count"] == 24 and en["exact_match"] == 100.0 and en["f1"] == 100.0
  assert "| zh |" in report_lib.markdown(report)


def test_glue_and_cli(tiny, mocked, tmp_path):
  out = tmp_path / "out"
  rc = cli.main(["--hf-dir", tiny["hf_dir"], "--task", "glue/sst2", "--steps", "3",
                 "--batch-size", "16", "--max-length", str(L), "--out", str(out)])
  assert rc == 0
  report = json.loads((out / "glue_sst2.json").read_text())
  assert list(report["results"]) == ["validation"] and report["results"]["validation"]["count"] == 64
  assert len(report["train"]["losses"]) == 3
  assert "| validation |" in (out / "glue_sst2.md").read_text()
  import sys
  assert "tensorflow" not in sys.modules                  # TFDS data sources, no TensorFlow


def test_jsonl_data_and_cli_errors(tiny, tmp_path, capsys):
  train = tmp_path / "train.jsonl"
  train.write_text("".join(json.dumps({"premise": p, "hypothesis": h, "label": y}) + "\n"
                           for y, p, h in (nli_record(i) for i in range(20))))
  ev = tmp_path / "de.jsonl"
  ev.write_text(train.read_text())
  out = tmp_path / "o"
  rc = cli.main(["--hf-dir", tiny["hf_dir"], "--task", "xnli", "--steps", "2", "--max-length",
                 str(L), "--train-jsonl", str(train), "--eval-jsonl", f"de={ev}", "--out",
                 str(out)])
  assert rc == 0
  assert json.loads((out / "xnli.json").read_text())["results"]["de"]["count"] == 20
  capsys.readouterr()
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"premise": "a", "label": 1}\n{oops\n')
  for argv, msg in (
      (["--task", "nope", "--hf-dir", tiny["hf_dir"]], "unknown"),
      (["--task", "xnli", "--hf-dir", str(tmp_path / "missing")], "not found"),
      (["--task", "xnli", "--hf-dir", tiny["hf_dir"], "--langs", "xx"], "xx"),
      (["--task", "xnli", "--hf-dir", tiny["hf_dir"], "--train-jsonl", str(bad), "--steps", "1",
        "--max-length", str(L), "--eval-jsonl", f"de={ev}"], "bad.jsonl:2"),
      (["--task", "xnli", "--hf-dir", tiny["hf_dir"], "--train-jsonl", str(ev), "--steps", "1",
        "--max-length", str(L), "--eval-jsonl", f"de={ev}", "--num-labels", "2"], "label 2"),
      (["--task", "xnli", "--hf-dir", tiny["hf_dir"], "--steps", "0"], "--steps")):
    with pytest.raises(SystemExit) as e:
      rc = cli.main(argv)
      raise SystemExit(rc)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]   # argparse prints usage first
    assert err.startswith("bepa-transfer: error:") and msg in err, err


def test_stsb_regression_head(tiny, mocked):
  task = tasks.get_task("glue/stsb")
  assert task.kind == "regression" and task.num_labels == 1
  metric_sets = {t: tasks.get_task(f"glue/{t}").metric_set for t in ("cola", "mrpc", "qqp", "rte")}
  assert metric_sets == {"cola": "mcc", "mrpc": "f1_accuracy", "qqp": "f1_accuracy",
                         "rte": "accuracy"}
  rep = _run(tiny, task, steps=60, lr=3e-3)
  losses = rep["train"]["losses"]      # squared error on a 0 / 2.5 / 5 target
  assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
  r = rep["results"]["validation"]
  assert rep["metrics"] == ["pearson", "spearman"] and r["count"] == 48
  assert r["pearson"] > 50.0 and r["spearman"] > 0.0, r   # learnt the toy similarity
  assert "| validation |" in report_lib.markdown(rep)


def _mlqa_release(folder):
  """MLQA_V1/test/test-context-<c>-question-<q>.json for en, de (SQuAD v1 JSON)."""
  words = {"en": ("the cat is {} and sat on the mat.", "what colour is the cat?"),
           "de": ("die katze ist {} und sass auf der matte.", "welche farbe hat die katze?")}
  test = folder / "MLQA_V1" / "test"
  test.mkdir(parents=True)
  for c, (ctx_fmt, _) in words.items():
    for q, (_, question) in words.items():
      paragraphs = []
      for i in range(6):
        colour = COLOURS[i % 3]
        ctx = ctx_fmt.format(colour)
        answer = {"text": colour, "answer_start": ctx.index(colour)}
        paragraphs.append({"context": ctx, "qas": [{"id": f"{c}{q}{i}", "question": question,
                                                    "answers": [answer]}]})
      (test / f"test-context-{c}-question-{q}.json").write_text(
          json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
  return folder / "MLQA_V1"


def test_mlqa_gxlt_cli_and_compare(tiny, tmp_path, capsys):
  train = tmp_path / "squad.jsonl"
  rows = []
  for i in range(24):
    c = COLOURS[i % 3]
    ctx = f"the cat is {c} and sat on the mat."
    rows.append({"id": f"t{i}", "question": "what colour is the cat?", "context": ctx,
                 "answers": {"text": [c], "answer_start": [ctx.index(c)]}})
  train.write_text("".join(json.dumps(r) + "\n" for r in rows))
  data = _mlqa_release(tmp_path)
  out = tmp_path / "run"
  argv = ["--hf-dir", tiny["hf_dir"], "--task", "mlqa-gxlt", "--mlqa-data", str(data),
          "--train-jsonl", str(train), "--steps", "30", "--lr", "1e-2", "--batch-size", "16",
          "--max-length", str(L), "--out", str(out)]
  assert cli.main(argv) == 0
  rep = json.loads((out / "mlqa-gxlt.json").read_text())
  g = rep["gxlt"]
  assert g["langs"] == ["en", "de"] and list(rep["results"]) == ["de-de", "de-en", "en-de",
                                                                   "en-en"]
  assert g["same_language"]["pairs"] == 2 and g["mixed"]["pairs"] == 2
  assert rep["results"]["en-en"] == {"exact_match": 100.0, "f1": 100.0, "count": 6}
  assert g["f1"][0][0] == 100.0 and all(0 <= v <= 100 for row in g["f1"] for v in row)
  md = (out / "mlqa-gxlt.md").read_text()
  assert "| c=de |" in md and "mixed pairs (2 pairs)" in md
  capsys.readouterr()
  assert cli.main(argv) == 2        # the results exist: refused before fine-tuning
  assert "exists (nothing overwritten)" in capsys.readouterr().err
  # the run against itself: every difference 0, heatmap written beside the JSON
  assert cli.main(["--compare", str(out), str(out / "mlqa-gxlt.json"), "--out",
                   str(tmp_path / "cmp")]) == 0
  c = json.loads((tmp_path / "cmp" / "compare-mlqa-gxlt.json").read_text())
  assert c["gxlt"]["f1"]["diff"] == [[0.0, 0.0], [0.0, 0.0]]
  assert (tmp_path / "cmp" / "compare-mlqa-gxlt-gxlt.png").stat().st_size > 5000
