"""A transfer run's results -> its report (averages, MLQA's G-XLT table) and Markdown.

Report JSON (written by `bepa-transfer` as <out>/<task>.json):
  task, kind, metric (the headline metric), metrics (all reported, headline first),
  average (headline mean over evaluation sets), averages {metric: mean},
  results {set: {metric: value, count}}, train {...}, model, settings;
  mlqa-gxlt also: gxlt {langs, pairs {set: [context, question]}, f1 / exact_match: rows =
  context language, columns = question language (None where a pair was not evaluated),
  same_language / mixed: {f1, exact_match, pairs}}.
"""
from __future__ import annotations

import numpy as np

from bepa_jax.finetune import metrics

# MLQA's own order (its paper's tables): en es de ar hi vi zh.
MLQA_ORDER = ("en", "es", "de", "ar", "hi", "vi", "zh")
LABELS = {"accuracy": "accuracy", "f1": "F1", "exact_match": "exact match",
          "matthews_corrcoef": "Matthews corr.", "pearson": "Pearson", "spearman": "Spearman"}


def order_langs(langs) -> list[str]:
  langs = set(langs)
  return [l for l in MLQA_ORDER if l in langs] + sorted(langs - set(MLQA_ORDER))


def gxlt_table(results: dict, pairs: dict) -> dict:
  """Per-pair results {key: {f1, exact_match}} and {key: (context, question)} -> the G-XLT
  matrices, the mean of the same-language diagonal and the mean of the mixed pairs."""
  langs = order_langs(l for p in pairs.values() for l in p)
  where = {tuple(p): k for k, p in pairs.items()}
  out = {"langs": langs, "pairs": {k: list(p) for k, p in pairs.items()}}
  for name in ("f1", "exact_match"):
    out[name] = [[results[where[(c, q)]][name] if (c, q) in where else None for q in langs]
                 for c in langs]
  for part, same in (("same_language", True), ("mixed", False)):
    keys = [k for k, (c, q) in pairs.items() if (c == q) == same]
    out[part] = {name: (float(np.mean([results[k][name] for k in keys])) if keys else None)
                 for name in ("f1", "exact_match")}
    out[part]["pairs"] = len(keys)
  return out


def build(task, results: dict, train: dict) -> dict:
  names = list(metrics.METRIC_SETS[task.metric_set])
  averages = metrics.mean_scores(results, names)
  report = {"task": task.name, "kind": task.kind, "metric": names[0], "metrics": names,
            "average": averages[names[0]], "averages": averages, "results": results,
            "train": train}
  if task.pairs:
    report["gxlt"] = gxlt_table(results, task.pairs)
  return report


def fmt(v, digits: int = 1) -> str:
  return "n/a" if v is None else f"{v:.{digits}f}"


def _matrix_md(title: str, langs, matrix) -> str:
  head = (f"| {title} | " + " | ".join(f"q={q}" for q in langs) + " |\n|---|"
          + "---:|" * len(langs) + "\n")
  return head + "\n".join(f"| c={c} | " + " | ".join(fmt(v) for v in row) + " |"
                          for c, row in zip(langs, matrix)) + "\n"


def markdown(report: dict) -> str:
  """A row per language (or split, or pair) with every metric, and the averages; for G-XLT
  the F1 and EM matrices and the same-language / mixed-pair means."""
  names = report.get("metrics") or [report["metric"]]
  res = report["results"]
  unit = "questions" if report["kind"] == "span" else "examples"
  head = ("| set | " + " | ".join(LABELS.get(n, n) for n in names) + f" | {unit} |\n|---|"
          + "---:|" * (len(names) + 1) + "\n")
  rows = [f"| {k} | " + " | ".join(fmt(r.get(n)) for n in names) + f" | {r['count']} |"
          for k, r in res.items()]
  avg = report.get("averages") or {report["metric"]: report["average"]}
  rows.append("| **average** | " + " | ".join(fmt(avg.get(n)) for n in names) + " | |")
  t = report["train"]
  md = (f"### {report['task']} (zero-shot from English; {t['steps']} steps of "
        f"{t['batch_size']}, lr {t['learning_rate']:g})\n\n" + head + "\n".join(rows) + "\n")
  g = report.get("gxlt")
  if g:
    md += ("\nG-XLT (c = context language, q = question language):\n\n"
           + _matrix_md("F1", g["langs"], g["f1"]) + "\n"
           + _matrix_md("EM", g["langs"], g["exact_match"]) + "\n")
    for part, label in (("same_language", "same-language diagonal"), ("mixed", "mixed pairs")):
      s = g[part]
      md += (f"- {label} ({s['pairs']} pairs): F1 {fmt(s['f1'])}, "
             f"EM {fmt(s['exact_match'])}\n")
  return md
