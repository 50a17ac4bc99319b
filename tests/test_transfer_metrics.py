"""Transfer metrics, MLQA's G-XLT table and `bepa-transfer --compare`, checked against values
computed by hand (each hand computation is written next to its assert). No model here."""
import json

import pytest

from bepa_jax.errors import BepaError
from bepa_jax.cli import transfer as cli
from bepa_jax.finetune import compare, metrics, report, tasks


# ----------------------------------------------------------------------------- span answers
def test_squad_v11_scoring_by_hand():
  # lower "the  eiffel-tower!" -> drop ASCII punctuation "the  eiffeltower" -> drop "the"
  assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
  assert metrics.exact_match("the Paris.", "Paris") == 1.0
  # {new, york, city} vs {york, city, council}: 2 shared, p = r = 2/3 -> F1 2/3
  assert metrics.f1("New York City", "York City Council") == pytest.approx(2 / 3)
  assert metrics.f1("a b", "c") == 0.0
  # both normalise to "": EM 1, but F1 0 (no shared token), as evaluate-v1.1.py returns
  assert metrics.exact_match("The", "a") == 1.0 and metrics.f1("The", "a") == 0.0
  # SQuAD's punctuation is ASCII only: the guillemets stay ("«paris»" != "paris"); MLQA's
  # (every Unicode P* category) drops them
  assert metrics.normalize_answer("«Paris»") == "«paris»"
  assert metrics.exact_match("«Paris»", "Paris") == 0.0
  assert metrics.exact_match("«Paris»", "Paris", "en") == 1.0
  # "$" is in string.punctuation (a symbol, Sc), so both drop it; "€" (Sc) is in neither
  assert metrics.normalize_answer("$5 €", "en") == "5 €" == metrics.normalize_answer("$5 €")
  # CJK under SQuAD: "北京" and "北京市" are single, different tokens -> F1 0 (the authors'
  # whitespace F1); MLQA's zh rule below counts characters instead
  assert metrics.f1("北京", "北京市") == 0.0


def test_mlqa_normalisation_per_language_by_hand():
  n = metrics.normalize_answer
  # es: lower "el río de la plata", drop el / la -> "río de plata"
  assert n("El río de la Plata", "es") == "río de plata"
  # de: drop die / des
  assert n("Die Hauptstadt des Landes", "de") == "hauptstadt landes"
  # vi: drop cái / của
  assert n("cái bàn của tôi", "vi") == "bàn tôi"
  # hi: no articles; "।" (danda, category Po) is punctuation
  assert n("भारत की राजधानी।", "hi") == "भारत की राजधानी"
  # ar: every "ال" becomes a space, the article prefix ("المدينة" -> " مدينة") and also the
  # letters inside a word ("الجبال" -> " جب "): MLQA's regex, kept as it is
  assert n("المدينة المنورة", "ar") == "مدينة منورة"
  assert n("الجبال", "ar") == "جب" == n("جبال", "ar")
  # zh mixed segmentation: each Chinese character a token, other runs whitespace-split;
  # the full stop goes with the punctuation first
  assert n("2008年北京奥运会。", "zh") == "2008 年 北 京 奥 运 会"
  assert n("Beijing 北京", "zh") == "beijing 北 京"
  with pytest.raises(BepaError, match="'fr'"):
    n("le chat", "fr")


def test_mlqa_f1_em_by_hand():
  # zh, a Chinese answer: pred 北 京 vs gold 北 京 市: 2 shared, p = 2/2, r = 2/3 -> F1 0.8
  assert metrics.f1("北京", "北京市", "zh") == pytest.approx(0.8)
  # pred 北京奥运会 (5 chars) vs 2008年北京奥运会 (7 tokens: 2008 年 北 京 奥 运 会):
  # 5 shared, p = 1, r = 5/7 -> F1 = 2 * (5/7) / (12/7) = 10/12
  assert metrics.f1("北京奥运会", "2008年北京奥运会", "zh") == pytest.approx(10 / 12)
  assert metrics.exact_match("北京。", "北京", "zh") == 1.0
  # ar: "أحمر اللون" -> [أحمر, لون] vs [أحمر]: p 1/2, r 1 -> F1 2/3
  assert metrics.f1("أحمر اللون", "أحمر", "ar") == pytest.approx(2 / 3)
  # de: "der Rhein" vs "Rhein": EM 1 once the article goes
  assert metrics.exact_match("der Rhein", "Rhein", "de") == 1.0
  # max over gold answers: "sat on mat" vs "on the mat" -> [sat,on,mat] vs [on,mat]:
  # p 2/3, r 1 -> 0.8; vs "the mat" -> [mat]: p 1/3, r 1 -> 0.5; best 0.8, EM 0.
  # With "Paris" vs ["paris", "x"]: EM 1, F1 1. Mean: EM 50, F1 90.
  s = metrics.span_scores(["sat on mat", "Paris"], [["on the mat", "the mat"], ["paris", "x"]],
                          "en")
  assert s == {"exact_match": 50.0, "f1": pytest.approx(90.0), "count": 2}


# ----------------------------------------------------------------------------- classification
def test_glue_metrics_by_hand():
  preds, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
  # tp = 2 (rows 0, 4), fp = 1 (row 1), tn = 2 (rows 2, 3), fn = 1 (row 5)
  # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (4 - 1) / sqrt(3^4) = 1/3
  assert metrics.matthews_corrcoef(preds, labels) == pytest.approx(1 / 3)
  assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # one predicted class: 0
  assert metrics.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
  # F1 = 2tp / (2tp + fp + fn) = 4 / 6; accuracy 4 / 6
  assert metrics.binary_f1(preds, labels) == pytest.approx(2 / 3)
  assert metrics.classification_scores("f1_accuracy", preds, labels) == {
      "f1": pytest.approx(200 / 3), "accuracy": pytest.approx(200 / 3), "count": 6}
  assert metrics.classification_scores("mcc", preds, labels) == {
      "matthews_corrcoef": pytest.approx(100 / 3), "count": 6}
  # Pearson: x 1 2 3 4 (mean 2.5), y 2 4 5 9 (mean 5); dx = -1.5 -.5 .5 1.5, dy = -3 -1 0 4;
  # dx.dy = 4.5 + .5 + 0 + 6 = 11, |dx|^2 = 5, |dy|^2 = 26 -> r = 11 / sqrt(130)
  assert metrics.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / 130 ** 0.5)
  # Spearman with a tie: ranks of 1 2 2 3 are 1 2.5 2.5 4, of 1 3 2 4 are 1 3 2 4;
  # dx = -1.5 0 0 1.5, dy = -1.5 .5 -.5 1.5: dx.dy = 4.5, |dx|^2 = 4.5, |dy|^2 = 5
  # -> 4.5 / sqrt(22.5) = 3 / sqrt(10)
  assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / 10 ** 0.5)
  assert metrics.pearson([1, 1, 1], [1, 2, 3]) is None       # constant: undefined, not 0
  s = metrics.classification_scores("pearson_spearman", [1, 2, 3, 4], [2, 4, 5, 9])
  assert s["pearson"] == pytest.approx(100 * 11 / 130 ** 0.5) and s["spearman"] == 100.0
  assert metrics.accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == {"accuracy": 50.0, "count": 4}


def test_metrics_agree_with_sklearn_and_scipy():
  np = pytest.importorskip("numpy")
  skm = pytest.importorskip("sklearn.metrics")
  stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
  assert metrics.matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
  assert metrics.binary_f1(p, y) == pytest.approx(skm.f1_score(y, p))
  y3, p3 = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
  assert metrics.matthews_corrcoef(p3, y3) == pytest.approx(skm.matthews_corrcoef(y3, p3))
  a, b = rng.integers(0, 6, 100).astype(float), rng.normal(size=100)   # ties in a
  assert metrics.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0])
  assert metrics.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0])


def _task(name, **kw):
  kw.setdefault("metric_set", "accuracy")
  return tasks.Task(name, kw.pop("kind", "classification"), 3, None, {}, **kw)


def test_xnli_and_glue_reports_by_hand():
  # XNLI: en 3 of 4 right = 75.0, de 1 of 3 = 33.33; average (unweighted) = 54.1667
  results = {"en": metrics.accuracy([0, 1, 2, 0], [0, 1, 2, 1]),
             "de": metrics.accuracy([0, 0, 0], [0, 1, 2])}
  r = report.build(_task("xnli"), results, {"steps": 1, "batch_size": 2, "learning_rate": 1.0})
  assert r["metric"] == "accuracy" and r["average"] == pytest.approx((75 + 100 / 3) / 2)
  md = report.markdown(r)
  assert "| de | 33.3 | 3 |" in md and "| **average** | 54.2 |" in md
  # MRPC: F1 headline, accuracy too; an undefined Pearson makes the average undefined
  t = _task("glue/mrpc", metric_set="f1_accuracy")
  r = report.build(t, {"validation": metrics.classification_scores(
      "f1_accuracy", [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1])}, {"steps": 1, "batch_size": 2,
                                                              "learning_rate": 1.0})
  assert r["metrics"] == ["f1", "accuracy"] and r["average"] == pytest.approx(200 / 3)
  t = _task("glue/stsb", kind="regression", metric_set="pearson_spearman")
  r = report.build(t, {"validation": metrics.classification_scores(
      "pearson_spearman", [2.0, 2.0], [1.0, 3.0])}, {"steps": 1, "batch_size": 2,
                                                     "learning_rate": 1.0})
  assert r["average"] is None and "| validation | n/a | n/a | 2 |" in report.markdown(r)


# ----------------------------------------------------------------------------- G-XLT
# Three languages' contexts, each asked in en, ar and zh (an Arabic question included).
QUESTIONS = {"colour": {"en": "What colour is the cat?", "ar": "ما لون القط؟",
                        "zh": "猫是什么颜色的？"},
             "where": {"en": "Where did the cat sit?", "ar": "أين جلس القط؟", "zh": "猫坐在哪里？"}}
CONTEXTS = {"en": ("The red cat sat on the mat.", [("colour", ["red"]),
                                                    ("where", ["on the mat", "the mat"])]),
            "ar": ("القط أحمر اللون.", [("colour", ["أحمر"])]),
            "zh": ("猫是红色的。", [("colour", ["红色"])])}
# Predictions per (context, question) pair, and their hand scores (F1, EM in percent):
PREDICTIONS = {
    ("en", "en"): ["the red", "sat on mat"],  # EM 1, F1 1; max(0.8, 0.5) (see above) -> 90, 50
    ("en", "ar"): ["Red."],                   # "red" = "red": 100, 100
    ("en", "zh"): ["red cat"],                # [red, cat] vs [red]: p 1/2, r 1 -> 66.7, 0
    ("ar", "en"): ["أحمر اللون"],             # [أحمر, لون] vs [أحمر] -> 66.7, 0
    ("ar", "ar"): ["أحمر"],                   # 100, 100
    ("ar", "zh"): ["القط"],                   # [قط] vs [أحمر] -> 0, 0
    ("zh", "en"): ["红"],                     # [红] vs [红, 色]: p 1, r 1/2 -> 66.7, 0
    ("zh", "ar"): ["是红色"],                 # [是,红,色] vs [红,色]: p 2/3, r 1 -> 80, 0
    ("zh", "zh"): ["红色"],                   # 100, 100
}
# rows = context en, ar, zh (MLQA's order), columns = question en, ar, zh
F1 = [[90.0, 100.0, 200 / 3], [200 / 3, 100.0, 0.0], [200 / 3, 80.0, 100.0]]
EM = [[50.0, 100.0, 0.0], [0.0, 100.0, 0.0], [0.0, 0.0, 100.0]]
# diagonal: F1 (90 + 100 + 100) / 3, EM (50 + 100 + 100) / 3
# mixed (6 pairs): F1 (100 + 66.7 + 66.7 + 0 + 66.7 + 80) / 6 = 380 / 6, EM 100 / 6


def _qas(c, q):
  """The context in language c and its questions in language q, SQuAD JSON style."""
  ctx, qas = CONTEXTS[c]
  return ctx, [{"id": f"{c}{q}{i}", "question": QUESTIONS[name][q],
                "answers": [{"text": a, "answer_start": ctx.find(a)} for a in golds]}
               for i, (name, golds) in enumerate(qas)]


def write_release(folder):
  """MLQA_V1/test/test-context-<c>-question-<q>.json files (SQuAD v1 JSON)."""
  test = folder / "MLQA_V1" / "test"
  test.mkdir(parents=True)
  for c in CONTEXTS:
    for q in CONTEXTS:
      ctx, qas = _qas(c, q)
      doc = {"version": 1.0, "data": [{"title": "t", "paragraphs": [{"context": ctx,
                                                                     "qas": qas}]}]}
      (test / f"test-context-{c}-question-{q}.json").write_text(
          json.dumps(doc, ensure_ascii=False), encoding="utf-8")
  (test / "README.txt").write_text("not a data file")
  return folder / "MLQA_V1"


def _score(task):
  """Scores PREDICTIONS as MLQA's script does: in the context language, by question id."""
  results = {}
  for key, read in task.evals.items():
    recs = read()
    preds = PREDICTIONS[task.pairs[key]] if task.pairs else PREDICTIONS[(key, key)]
    results[key] = metrics.span_scores(preds, [r["answers"] for r in recs],
                                       task.score_langs[key])
  return report.build(task, results, {"steps": 1, "batch_size": 2, "learning_rate": 1.0})


def _check_table(g):
  assert g["langs"] == ["en", "ar", "zh"]
  for got, want in ((g["f1"], F1), (g["exact_match"], EM)):
    assert [[pytest.approx(v) for v in row] for row in want] == got
  assert g["same_language"] == {"f1": pytest.approx(290 / 3),
                                "exact_match": pytest.approx(250 / 3), "pairs": 3}
  assert g["mixed"] == {"f1": pytest.approx(380 / 6), "exact_match": pytest.approx(100 / 6),
                        "pairs": 6}


def test_gxlt_table_from_release_files(tmp_path):
  root = write_release(tmp_path)
  task = tasks.get_task("mlqa-gxlt", mlqa_data=str(root))          # finds MLQA_V1/test/
  assert len(task.evals) == 9 and task.pairs["en-ar"] == ("en", "ar")
  assert task.score_langs["en-ar"] == "en" and task.score_langs["zh-en"] == "zh"
  rec = task.evals["en-ar"]()[0]
  assert rec["question"] == "ما لون القط؟" and rec["answers"] == ["red"]
  assert rec["answer_starts"] == [4]
  r = _score(task)
  _check_table(r["gxlt"])
  md = report.markdown(r)
  assert "| c=zh | 66.7 | 80.0 | 100.0 |" in md and "mixed pairs (6 pairs): F1 63.3" in md
  # --langs keeps the pairs of the languages asked for; mlqa reads the diagonal only
  sub = tasks.get_task("mlqa-gxlt", mlqa_data=str(root / "test"), langs=["en", "zh"])
  assert sorted(sub.evals) == ["en-en", "en-zh", "zh-en", "zh-zh"]
  same = tasks.get_task("mlqa", mlqa_data=str(root))
  assert list(same.evals) == ["ar", "en", "zh"] and same.score_langs["zh"] == "zh"
  assert _score(same)["results"]["en"] == {"exact_match": 50.0, "f1": pytest.approx(90.0),
                                           "count": 2}


def test_gxlt_table_from_jsonl(tmp_path):
  path = tmp_path / "mlqa.jsonl"
  lines = []
  for c in CONTEXTS:
    for q in CONTEXTS:
      ctx, qas = _qas(c, q)
      for qa in qas:
        lines.append(json.dumps({**qa, "context": ctx, "context_lang": c, "question_lang": q},
                                ensure_ascii=False))
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  task = tasks.get_task("mlqa-gxlt", mlqa_data=str(path))
  _check_table(_score(task)["gxlt"])


def test_mlqa_data_errors(tmp_path):
  root = write_release(tmp_path)
  bad = root / "test" / "test-context-en-question-zh.json"
  bad.write_text('{"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "1", '
                 '"question": "q"}]}]}]}')
  task = tasks.get_task("mlqa-gxlt", mlqa_data=str(root))
  with pytest.raises(BepaError, match=r"question-zh.json: data\[0\].paragraphs\[0\].qas\[0\] "
                                      r"lacks 'answers'"):
    task.evals["en-zh"]()
  bad.write_text('{"data": [\n{oops')
  with pytest.raises(BepaError, match=r"question-zh.json:2: not valid JSON"):
    task.evals["en-zh"]()
  with pytest.raises(BepaError, match="no test-context-<c>-question-<q>.json"):
    tasks.get_task("mlqa-gxlt", mlqa_data=str(tmp_path))
  with pytest.raises(BepaError, match="needs --mlqa-data|pass --mlqa-data"):
    tasks.get_task("mlqa-gxlt")
  (root / "test" / "test-context-fr-question-fr.json").write_text(bad.read_text())
  with pytest.raises(BepaError, match="'fr'"):       # no MLQA scoring rule for fr
    tasks.get_task("mlqa-gxlt", mlqa_data=str(root))
  j = tmp_path / "m.jsonl"
  j.write_text(json.dumps({"id": "1", "context": "c", "question": "q", "context_lang": "en",
                           "answers": [{"text": "c", "answer_start": 0}]}) + "\n")
  with pytest.raises(BepaError, match="m.jsonl:1: record lacks field 'question_lang'"):
    tasks.get_task("mlqa-gxlt", mlqa_data=str(j))
  with pytest.raises(BepaError, match="scored in their language"):
    tasks.get_task("mlqa", eval_jsonl={"xx": str(j)})
  # local span sets: an MLQA language scores in it, "squad" by SQuAD v1.1 (None)
  local = tasks.get_task("mlqa", eval_jsonl={"squad": str(j), "zh": str(j)})
  assert local.score_langs == {"squad": None, "zh": "zh"}


# ----------------------------------------------------------------------------- compare
def _gxlt_report(f1, em, model):
  langs, results, pairs = ["en", "ar"], {}, {}
  for i, c in enumerate(langs):
    for j, q in enumerate(langs):
      results[f"{c}-{q}"] = {"f1": f1[i][j], "exact_match": em[i][j], "count": 10}
      pairs[f"{c}-{q}"] = (c, q)
  t = tasks.Task("mlqa-gxlt", "span", 2, None, {}, "span", {}, pairs)
  r = report.build(t, results, {"steps": 1, "batch_size": 2, "learning_rate": 1.0})
  r["model"] = {"path": model}
  return json.loads(json.dumps(r))   # as read back from disk


def test_compare_gxlt_by_hand(tmp_path, capsys):
  a = _gxlt_report([[80.0, 30.0], [40.0, 70.0]], [[60.0, 20.0], [30.0, 50.0]], "/m/xlmr")
  b = _gxlt_report([[82.0, 60.0], [50.0, 69.0]], [[61.0, 40.0], [35.0, 50.0]], "/m/bepa")
  (tmp_path / "a").mkdir()
  (tmp_path / "b" / "transfer").mkdir(parents=True)    # a model dir: results in transfer/
  (tmp_path / "a" / "mlqa-gxlt.json").write_text(json.dumps(a))
  (tmp_path / "b" / "transfer" / "mlqa-gxlt.json").write_text(json.dumps(b))
  (tmp_path / "b" / "config.json").write_text('{"model": 1}')          # not a result: skipped
  out = tmp_path / "cmp"
  rc = cli.main(["--compare", str(tmp_path / "a" / "mlqa-gxlt.json"), str(tmp_path / "b"),
                 "--out", str(out)])
  assert rc == 0
  c = json.loads((out / "compare-mlqa-gxlt.json").read_text())
  # B - A per cell: en-en +2, en-ar +30, ar-en +10, ar-ar -1
  assert c["gxlt"]["f1"]["diff"] == [[2.0, 30.0], [10.0, -1.0]]
  # mixed pairs: A (30 + 40) / 2 = 35, B (60 + 50) / 2 = 55, diff 20; diagonal A 75, B 75.5
  assert c["gxlt"]["mixed"]["f1"] == {"a": 35.0, "b": 55.0, "diff": 20.0}
  assert c["gxlt"]["same_language"]["f1"] == {"a": 75.0, "b": 75.5, "diff": 0.5}
  assert c["rows"]["en-ar"]["exact_match"] == {"a": 20.0, "b": 40.0, "diff": 20.0}
  # average over all 4 pairs: A 55, B 65.25
  assert c["averages"]["f1"] == {"a": 55.0, "b": 65.25, "diff": 10.25}
  md = (out / "compare-mlqa-gxlt.md").read_text()
  assert "| en-ar | 30.0 | 60.0 | +30.0 | 20.0 | 40.0 | +20.0 |" in md
  assert "| c=ar | +10.0 | -1.0 |" in md
  png = (out / "compare-mlqa-gxlt-gxlt.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
  capsys.readouterr()
  # a second run would overwrite: refused, the first outputs kept
  rc = cli.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
  assert rc == 2 and "exists (nothing overwritten)" in capsys.readouterr().err
  assert json.loads((out / "compare-mlqa-gxlt.json").read_text()) == c


def test_compare_languages_and_errors(tmp_path, capsys):
  t = _task("xnli")
  train = {"steps": 1, "batch_size": 2, "learning_rate": 1.0}
  a = report.build(t, {"en": {"accuracy": 80.0, "count": 5}, "de": {"accuracy": 70.0, "count": 5},
                       "fr": {"accuracy": 60.0, "count": 5}}, train)
  b = report.build(t, {"en": {"accuracy": 81.0, "count": 5},
                       "de": {"accuracy": 74.0, "count": 5}}, train)
  c = compare.compare(a, b, "A.json", "B.json")
  # fr only in A: shown, not averaged; averages over en, de: A 75, B 77.5
  assert c["only_a"] == ["fr"] and c["rows"]["fr"]["accuracy"] == {"a": 60.0, "b": None,
                                                                     "diff": None}
  assert c["averages"]["accuracy"] == {"a": 75.0, "b": 77.5, "diff": 2.5}
  assert "| fr | 60.0 | n/a | n/a |" in compare.markdown(c)
  pa, pb, pg = tmp_path / "xnli_a.json", tmp_path / "xnli_b.json", tmp_path / "glue.json"
  pa.write_text(json.dumps(a))
  pb.write_text(json.dumps(b))
  pg.write_text(json.dumps(report.build(_task("glue/sst2"), {"validation": {
      "accuracy": 90.0, "count": 3}}, {"steps": 1, "batch_size": 2, "learning_rate": 1.0})))
  broken = tmp_path / "broken.json"
  broken.write_text('{"task": "xnli",\n "results": [')
  for argv, msg in (
      ([str(tmp_path / "nope.json"), str(pb)], "nope.json: not found"),
      ([str(broken), str(pb)], "broken.json:2: not valid JSON"),
      ([str(pa), str(pg)], "mismatched tasks"),
      ([str(tmp_path / "cfg"), str(pb)], "not found"),
      ([str(pa), str(pb), "--task", "glue/sst2"], "no result for task glue/sst2")):
    rc = cli.main(["--compare"] + argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("bepa-transfer: error:"), err
    assert msg in err[0], err
  with pytest.raises(SystemExit) as e:  # a training flag with --compare is refused, not ignored
    cli.main(["--compare", str(pa), str(pb), "--steps", "5"])
  assert e.value.code == 2
  assert "--steps would be ignored" in capsys.readouterr().err
  (tmp_path / "notreport.json").write_text('{"a": 1}')
  with pytest.raises(BepaError, match="not a bepa-transfer result"):
    compare.load_reports(str(tmp_path / "notreport.json"))
