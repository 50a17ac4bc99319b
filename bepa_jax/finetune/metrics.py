r"""Task metrics, each as its benchmark's official scorer computes it (all in percent).

Span answers (exact match / F1, the best over the gold answers of a question):
  * MLQA: `mlqa_evaluation_v1.py` of facebookresearch/MLQA, which scores with the *answer*
    (= context) language. normalize_answer(s, lang) applies, in this order:
      1. lower();
      2. drop every character in PUNCT = {all code points whose unicodedata category starts
         with "P"} | string.punctuation (so ASCII symbols such as $ + < = > ^ ` | ~ go too);
      3. remove articles with a `\b` regex, replaced by a space:
           en  a|an|the              es  un|una|unos|unas|el|la|los|las
           de  ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des
           vi  của|là|cái|chiếc|những  ar  the pattern '\sال^|ال', whose first branch can never
           match ('^' after two characters), so *every* 'ال' in the text becomes a space: the
           article prefix, and also the letters ا+ل inside a word ('الجبال' -> ' جب ')
           hi, zh: no articles;
      4. tokens: whitespace split for en, es, hi, vi, de, ar; for zh "mixed segmentation":
         each character in [\u4e00-\u9fa5] or in PUNCT is a token of its own, the runs between
         them are whitespace-split; tokens are joined with single spaces.
    F1 splits the normalised string on spaces (so zh F1 counts characters, not words), takes
    the multiset overlap, and is 0 when nothing overlaps; EM compares normalised strings. The
    script raises on any other language, and so do we.
  * SQuAD v1.1 (`evaluate-v1.1.py`, lang=None): the same steps with English articles, but
    punctuation is string.punctuation only (Unicode quotes and dashes stay) and tokens are
    whitespace-split. MLQA's "en" differs from it only in that punctuation set.
GLUE (scikit-learn / scipy, as the GLUE baselines and HF's `glue` metric compute them):
  cola Matthews correlation; mrpc, qqp F1 of the positive class 1 and accuracy; stsb Pearson
  and Spearman correlation (ranks of ties averaged); the others accuracy. XNLI: accuracy.
"""
from __future__ import annotations

import collections
import re
import string
import sys
import unicodedata

import numpy as np

from bepa_jax.errors import InputError

PUNCT = frozenset(
    {chr(i) for i in range(sys.maxunicode) if unicodedata.category(chr(i)).startswith("P")}
    | set(string.punctuation))
_SQUAD_PUNCT = frozenset(string.punctuation)
_ARTICLES = {
    "en": re.compile(r"\b(a|an|the)\b"),
    "es": re.compile(r"\b(un|una|unos|unas|el|la|los|las)\b"),
    "de": re.compile(r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b"),
    "vi": re.compile(r"\b(của|là|cái|chiếc|những)\b"),
    "ar": re.compile(r"\sال^|ال"),
    "hi": None,
    "zh": None,
}
MLQA_SCORING_LANGS = tuple(sorted(_ARTICLES))
_ZH_CHAR = re.compile(r"[\u4e00-\u9fa5]")


def _mixed_segmentation(text: str) -> list[str]:
  """MLQA's zh tokens: every Chinese character and punctuation mark alone, whitespace-split
  runs between them."""
  out, run = [], ""
  for c in text:
    if _ZH_CHAR.search(c) or c in PUNCT:
      out.extend(run.split())
      run = ""
      out.append(c)
    else:
      run += c
  out.extend(run.split())
  return out


def _check_lang(lang):
  if lang is not None and lang not in _ARTICLES:
    raise InputError(f"MLQA scoring has no language {lang!r} (it knows "
                     f"{', '.join(MLQA_SCORING_LANGS)}; None = SQuAD v1.1)")


def normalize_answer(s: str, lang: str | None = None) -> str:
  """MLQA's normalisation for `lang` (the answer's language); lang=None: SQuAD v1.1's."""
  _check_lang(lang)
  s = s.lower()
  punct = _SQUAD_PUNCT if lang is None else PUNCT
  s = "".join(c for c in s if c not in punct)
  articles = _ARTICLES["en"] if lang is None else _ARTICLES[lang]
  if articles is not None:
    s = articles.sub(" ", s)
  tokens = _mixed_segmentation(s) if lang == "zh" else s.split()
  return " ".join(t for t in tokens if t.strip())


def exact_match(prediction: str, truth: str, lang: str | None = None) -> float:
  return float(normalize_answer(prediction, lang) == normalize_answer(truth, lang))


def f1(prediction: str, truth: str, lang: str | None = None) -> float:
  p = normalize_answer(prediction, lang).split()
  t = normalize_answer(truth, lang).split()
  same = sum((collections.Counter(p) & collections.Counter(t)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(p), same / len(t)
  return 2 * precision * recall / (precision + recall)


def span_scores(predictions, answers, lang: str | None = None) -> dict:
  """Mean over questions of the best EM / F1 against any gold answer, in percent; `lang` as in
  normalize_answer (MLQA: the context language)."""
  _check_lang(lang)
  if not predictions:
    return {"exact_match": 0.0, "f1": 0.0, "count": 0}
  em = [max(exact_match(p, a, lang) for a in (gold or [""]))
        for p, gold in zip(predictions, answers)]
  fs = [max(f1(p, a, lang) for a in (gold or [""])) for p, gold in zip(predictions, answers)]
  return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(fs)),
          "count": len(predictions)}


# ----------------------------------------------------------------------------- classification
def accuracy(predictions, labels) -> dict:
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  acc = float((predictions == labels).mean()) if labels.size else 0.0
  return {"accuracy": 100.0 * acc, "count": int(labels.size)}


def matthews_corrcoef(predictions, labels) -> float:
  """Matthews correlation (multi-class form of sklearn.metrics.matthews_corrcoef, which is
  (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) for two classes); 0 when a
  denominator factor is 0, as sklearn returns."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  classes = np.union1d(predictions, labels)
  conf = np.array([[np.sum((labels == a) & (predictions == b)) for b in classes]
                   for a in classes], np.float64)
  t, p = conf.sum(1), conf.sum(0)   # true / predicted counts per class
  n, c = conf.sum(), np.trace(conf)
  den = np.sqrt((n * n - p @ p) * (n * n - t @ t))
  return float((c * n - t @ p) / den) if den > 0 else 0.0


def binary_f1(predictions, labels, positive: int = 1) -> float:
  """F1 of the positive class (sklearn.metrics.f1_score's default); 0 without true positives."""
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  tp = np.sum((predictions == positive) & (labels == positive))
  fp = np.sum((predictions == positive) & (labels != positive))
  fn = np.sum((predictions != positive) & (labels == positive))
  return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, ties given their average rank (scipy.stats.rankdata 'average')."""
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x), np.float64)
  sx = x[order]
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and sx[j + 1] == sx[i]:
      j += 1
    ranks[order[i:j + 1]] = (i + j) / 2 + 1
    i = j + 1
  return ranks


def pearson(x, y) -> float | None:
  """Pearson correlation; None (undefined) when either side is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  dx, dy = x - x.mean(), y - y.mean()
  den = np.sqrt((dx @ dx) * (dy @ dy))
  return float(dx @ dy / den) if den > 0 else None


def spearman(x, y) -> float | None:
  """Spearman correlation = Pearson of the (tie-averaged) ranks."""
  return pearson(_ranks(np.asarray(x, np.float64)), _ranks(np.asarray(y, np.float64)))


def _pct(v):
  return None if v is None else 100.0 * v


def classification_scores(metric_set: str, predictions, labels) -> dict:
  """{metric: percent, ..., "count"} of one evaluation set; metric_set names the task's
  official metrics: accuracy | mcc | f1_accuracy | pearson_spearman."""
  labels = np.asarray(labels)
  out = {}
  if metric_set == "mcc":
    out["matthews_corrcoef"] = 100.0 * matthews_corrcoef(predictions, labels)
  elif metric_set == "f1_accuracy":
    out["f1"] = 100.0 * binary_f1(predictions, labels)
    out.update(accuracy(predictions, labels))
  elif metric_set == "pearson_spearman":
    out["pearson"] = _pct(pearson(predictions, labels))
    out["spearman"] = _pct(spearman(predictions, labels))
  elif metric_set == "accuracy":
    out.update(accuracy(predictions, labels))
  else:
    raise ValueError(f"unknown metric set {metric_set!r}")
  out["count"] = int(labels.size)
  return out


METRIC_SETS = {  # metric set -> its metrics, the first the headline one
    "accuracy": ("accuracy",),
    "mcc": ("matthews_corrcoef",),
    "f1_accuracy": ("f1", "accuracy"),
    "pearson_spearman": ("pearson", "spearman"),
    "span": ("f1", "exact_match"),
}


def mean_scores(results: dict, names) -> dict:
  """Unweighted mean over evaluation sets of each metric; None where any set's value is
  undefined (a constant-prediction correlation), never a mean over fewer sets."""
  out = {}
  for name in names:
    vals = [r.get(name) for r in results.values()]
    out[name] = (float(np.mean(vals)) if vals and all(v is not None for v in vals) else None)
  return out
