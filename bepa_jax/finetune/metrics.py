"""Task metrics: accuracy, and SQuAD v1.1 exact match / F1 (the official normalisation).

The MLQA paper changes the normalisation per language (punctuation sets, articles); we use
SQuAD's English one everywhere, as XTREME does, plus character-level tokens for CJK text.
"""
from __future__ import annotations

import collections
import re
import string
import unicodedata

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
  """Lower case, drop punctuation (ASCII and Unicode) and English articles, squash spaces."""
  s = s.lower()
  s = "".join(c for c in s if c not in _PUNCT and not unicodedata.category(c).startswith("P"))
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


def _tokens(s: str) -> list[str]:
  out = []
  for w in normalize_answer(s).split():
    if any(0x4E00 <= ord(c) <= 0x9FFF or 0x3040 <= ord(c) <= 0x30FF for c in w):
      out.extend(w)  # no spaces between CJK words: compare characters
    else:
      out.append(w)
  return out


def exact_match(prediction: str, truth: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(truth))


def f1(prediction: str, truth: str) -> float:
  p, t = _tokens(prediction), _tokens(truth)
  common = collections.Counter(p) & collections.Counter(t)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(p), same / len(t)
  return 2 * precision * recall / (precision + recall)


def squad_scores(predictions, answers) -> dict:
  """Mean over questions of the best EM / F1 against any gold answer, in percent."""
  if not predictions:
    return {"exact_match": 0.0, "f1": 0.0, "count": 0}
  em = [max(exact_match(p, a) for a in (gold or [""])) for p, gold in zip(predictions, answers)]
  fs = [max(f1(p, a) for a in (gold or [""])) for p, gold in zip(predictions, answers)]
  return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(fs)),
          "count": len(predictions)}


def accuracy(predictions, labels) -> dict:
  predictions, labels = np.asarray(predictions), np.asarray(labels)
  acc = float((predictions == labels).mean()) if labels.size else 0.0
  return {"accuracy": 100.0 * acc, "count": int(labels.size)}
