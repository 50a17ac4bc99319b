"""One evaluation pass: embed every aligned set once, score retrieval, compute diagnostics.

Shared by `bepa-eval`, the periodic hook of the training loop and bench/repro_multi30k.py.
"""
from __future__ import annotations

import math
import re

import numpy as np

from bepa_jax.errors import InputError
from bepa_jax.eval import diagnostics, retrieval


def load_sets(tatoeba_dir: str | None = None, langs=(), parallel=(),
              max_sentences: int | None = None) -> list[retrieval.ParallelSet]:
  sets = []
  if tatoeba_dir and tatoeba_dir.split(":")[0] == "tfds":  # "tfds" or "tfds:DATA_DIR"
    if not langs:
      raise InputError("Tatoeba from TFDS needs the languages (--langs de,fr,...)")
    data_dir = tatoeba_dir.split(":", 1)[1] if ":" in tatoeba_dir else None
    for lang in langs:
      sets.append(retrieval.read_tatoeba_tfds(lang, max_sentences, data_dir))
  elif tatoeba_dir:
    for lang in langs or retrieval.tatoeba_languages(tatoeba_dir):
      sets.append(retrieval.read_tatoeba(tatoeba_dir, lang, max_sentences))
  if parallel:
    sets.append(retrieval.read_parallel(parallel, max_sentences))
  return sets


UNSEEN_SHARE = 0.05  # [UNK] tokens, or sentences of unknown pieces only, above which we warn


def unseen_languages(tokenizer, sets) -> str | None:
  """A warning (one line) naming each language the tokenizer mostly cannot read, with its
  [UNK] share and the sentences reduced to unknown pieces; None when every language reads."""
  from bepa_jax.eval.embed import unknown_counts
  counts: dict[str, list[int]] = {}
  for ps in sets:
    for lang, texts in zip(ps.languages, ps.texts):
      c = counts.setdefault(lang, [0, 0, 0, 0])
      c[:] = [a + b for a, b in zip(c, unknown_counts(tokenizer, texts))]
  bad = [f"{lang}: {unk / total:.0%} of tokens are [UNK] ({reduced} of {n} sentences reduced "
         f"to unknown pieces)" for lang, (unk, total, reduced, n) in counts.items()
         if total and (unk > UNSEEN_SHARE * total or reduced > UNSEEN_SHARE * n)]
  if not bad:
    return None
  return "; ".join(bad) + ": the tokenizer never saw " + (
      "this language, so its scores say little" if len(bad) == 1
      else "these languages, so their scores say little")


def run(embedder, sets, *, poolings=("cls", "mean"), margin: str | None = None, k: int = 4,
        seed: int = 0, map_per_lang: int = 100):
  """-> (report {"retrieval": ..., "diagnostics": ...}, plot data {pool: ...})."""
  embeddings = [{lang: embedder(list(texts)) for lang, texts in zip(ps.languages, ps.texts)}
                for ps in sets]
  check_finite(sets, embeddings)
  ret: dict = {}
  tatoeba = {ps.name.split("/", 1)[1]: retrieval.score_set(ps, emb, poolings, margin, k)
             for ps, emb in zip(sets, embeddings) if ps.name.startswith("tatoeba/")}
  if tatoeba:
    ret["tatoeba"] = tatoeba
    ret["tatoeba_average"] = retrieval.tatoeba_summary(tatoeba)
  for ps, emb in zip(sets, embeddings):
    if not ps.name.startswith("tatoeba/"):
      ret[ps.name] = retrieval.score_set(ps, emb, poolings, margin, k)
  diag, plot = diagnostics.compute(sets, embeddings, poolings, seed=seed,
                                   map_per_lang=map_per_lang)
  report = {"retrieval": ret, "diagnostics": diag,
            "sets": {ps.name: {"languages": list(ps.languages), "sentences": len(ps)}
                     for ps in sets}}
  return report, plot


def check_finite(sets, embeddings) -> None:
  """NaN/Inf embeddings stop the evaluation with one line naming the set, language and pooling
  (scores and the SVD of the diagnostics would fail on them, or report noise)."""
  for ps, emb in zip(sets, embeddings):
    for lang in ps.languages:
      for pool, x in emb[lang].items():
        bad = int(np.count_nonzero(~np.isfinite(x).all(axis=-1))) if len(x) else 0
        if bad:
          raise InputError(f"{bad} of {len(x)} {pool} embeddings of {ps.name} ({lang}) are not "
                           f"finite (NaN/Inf): the model's weights hold NaN/Inf or its inputs "
                           f"exceed its position embeddings")


def metric_name(key: str) -> str:
  """TensorBoard-safe: 'de->en' -> 'de_to_en', 'cls+ratio' -> 'cls_ratio'."""
  return re.sub(r"[^A-Za-z0-9_./-]", "_", key.replace("->", "_to_"))


def flatten(report: dict) -> dict[str, float]:
  """Scalars of a report as 'a/b/c' -> value (for MetricWriter), per-language details kept."""
  out = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
      out[metric_name(prefix)] = float(node)

  walk({"retrieval": report["retrieval"], "diagnostics": report["diagnostics"]}, "")
  return out


def _pct(x):
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def markdown(reports: dict[str, dict]) -> str:
  """A Markdown summary of one or more models' reports (columns = models)."""
  names = list(reports)
  head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
  lines = ["# bepa-eval report", ""]

  rows = []
  first = reports[names[0]]
  for pool in first["diagnostics"]:
    for key, label, fmt in (("effective_rank", "effective rank", "{:.2f}"),
                            ("pc1_share", "PC1 variance share", "{:.1%}"),
                            ("alignment", "alignment (lower = closer)", "{:.3f}"),
                            ("uniformity", "uniformity (lower = more uniform)", "{:.3f}"),
                            ("pair_cos", "mean cos, translation pairs", "{:.3f}"),
                            ("random_cos", "mean cos, random pairs", "{:.3f}"),
                            ("gap", "gap (pairs - random)", "{:.3f}")):
      vals = [fmt.format(reports[n]["diagnostics"][pool][key]) for n in names]
      rows.append(f"| {pool}: {label} | " + " | ".join(vals) + " |")
  lines += ["## Embedding-space diagnostics", "", head + "\n".join(rows), ""]

  ret = first["retrieval"]
  rows = []
  if "tatoeba" in ret:
    for lang, entry in ret["tatoeba"].items():
      for scoring, acc in entry[f"{lang}-eng"].items():
        for direction in acc:
          vals = [_pct(reports[n]["retrieval"]["tatoeba"][lang][f"{lang}-eng"][scoring][direction])
                  for n in names]
          rows.append(f"| tatoeba {direction} ({scoring}) | " + " | ".join(vals) + " |")
    for scoring, acc in ret["tatoeba_average"].items():
      for direction in acc:
        vals = [_pct(reports[n]["retrieval"]["tatoeba_average"][scoring][direction])
                for n in names]
        rows.append(f"| **tatoeba average {direction} ({scoring})** | " + " | ".join(vals) + " |")
  for set_name, pairs in ret.items():
    if set_name.startswith("tatoeba"):
      continue
    for pair, entry in pairs.items():
      for scoring, acc in entry.items():
        for direction in acc:
          vals = [_pct(reports[n]["retrieval"][set_name][pair][scoring][direction])
                  for n in names]
          rows.append(f"| {set_name} {direction} ({scoring}) | " + " | ".join(vals) + " |")
  if rows:
    lines += ["## Top-1 retrieval accuracy (%)", "", head + "\n".join(rows), ""]
  lines += ["Plots: spectrum.png, map.png (PCA, t-SNE by language), similarity_hist.png "
            "([CLS] pooling).", ""]
  return "\n".join(lines)
