"""`bepa-transfer --compare A B`: two checkpoints' transfer results side by side.

A and B are result JSON files of `bepa-transfer` runs, or directories holding them (an --out
dir, or a model dir whose transfer/ folder does). Every evaluation set gets a row with A, B and
B - A per metric; the averages are recomputed over the sets both sides have, so a difference
never mixes two bases. For mlqa-gxlt the F1 matrices of A, B and B - A go to a PNG heatmap
beside the JSON of the numbers.
"""
from __future__ import annotations

import json
import os

import numpy as np

from bepa_jax.errors import InputError
from bepa_jax.finetune import report as report_lib

_OUTPUT_PREFIX = "compare-"


def _is_report(doc) -> bool:
  return (isinstance(doc, dict) and isinstance(doc.get("task"), str)
          and isinstance(doc.get("results"), dict) and "kind" in doc)


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
  except UnicodeDecodeError:
    raise InputError(f"{path}: not a UTF-8 text file") from None


def _check_report(path: str, doc: dict):
  for key, r in doc["results"].items():
    if not isinstance(r, dict):
      raise InputError(f"{path}: results[{key!r}] is not an object")
    for name in doc.get("metrics") or [doc.get("metric")]:
      v = r.get(name)
      if v is not None and not isinstance(v, (int, float)):
        raise InputError(f"{path}: results[{key!r}].{name} is not a number")
  if "gxlt" in doc:
    pairs = doc["gxlt"].get("pairs") if isinstance(doc["gxlt"], dict) else None
    if not isinstance(pairs, dict) or not all(
        isinstance(p, list) and len(p) == 2 and k in doc["results"] for k, p in pairs.items()):
      raise InputError(f"{path}: gxlt.pairs must map result sets to [context, question]")


def load_reports(path: str) -> dict:
  """{task: (file, report)} of the result JSON at `path` (a file or a directory)."""
  if os.path.isfile(path):
    doc = _read_json(path)
    if not _is_report(doc):
      raise InputError(f"{path}: not a bepa-transfer result (needs 'task', 'kind', 'results')")
    _check_report(path, doc)
    return {doc["task"]: (path, doc)}
  if not os.path.isdir(path):
    raise InputError(f"{path}: not found")
  folders = [path] + ([os.path.join(path, "transfer")]
                      if os.path.isdir(os.path.join(path, "transfer")) else [])
  for folder in folders:
    found = {}
    for name in sorted(os.listdir(folder)):
      full = os.path.join(folder, name)
      if not name.endswith(".json") or name.startswith(_OUTPUT_PREFIX) or not os.path.isfile(full):
        continue
      doc = _read_json(full)
      if _is_report(doc):      # other JSON (a workdir's config.json) is not ours to judge
        _check_report(full, doc)
        if doc["task"] in found:
          raise InputError(f"{path}: two results for {doc['task']} "
                           f"({found[doc['task']][0]}, {full})")
        found[doc["task"]] = (full, doc)
    if found:
      return found
  raise InputError(f"{path}: no bepa-transfer result JSON in it (nor in its transfer/)")


def pick(a: dict, b: dict, a_path: str, b_path: str, task: str | None) -> list[str]:
  """The tasks to compare: `task`, or every task when both sides have the same ones."""
  if task:
    for side, path in ((a, a_path), (b, b_path)):
      if task not in side:
        raise InputError(f"{path}: no result for task {task} (has {', '.join(sorted(side))})")
    return [task]
  if set(a) != set(b):
    raise InputError(f"mismatched tasks: {a_path} has {', '.join(sorted(a))}, {b_path} has "
                     f"{', '.join(sorted(b))} (pick one with --task)")
  return sorted(a)


def _diff(x, y):
  return None if x is None or y is None else y - x


def _mean(vals):
  return float(np.mean(vals)) if vals and all(v is not None for v in vals) else None


def compare(a: dict, b: dict, a_path: str, b_path: str) -> dict:
  """Two reports of one task -> rows {set: {metric: {a, b, diff}}} and averages over the sets
  both have (diff = B - A); G-XLT matrices and means likewise."""
  if a["kind"] != b["kind"] or a["task"] != b["task"]:
    raise InputError(f"mismatched tasks: {a_path} is {a['task']} ({a['kind']}), {b_path} is "
                     f"{b['task']} ({b['kind']})")
  names = a.get("metrics") or [a["metric"]]
  if names != (b.get("metrics") or [b["metric"]]):
    raise InputError(f"mismatched metrics for {a['task']}: {a_path} reports {names}, "
                     f"{b_path} {b.get('metrics') or [b['metric']]}")
  ra, rb = a["results"], b["results"]
  keys = list(ra) + [k for k in rb if k not in ra]
  both = [k for k in keys if k in ra and k in rb]
  if not both:
    raise InputError(f"{a_path} and {b_path} share no evaluation set for {a['task']}")
  rows = {}
  for k in keys:
    rows[k] = {}
    for n in names:
      va, vb = ra.get(k, {}).get(n), rb.get(k, {}).get(n)
      rows[k][n] = {"a": va, "b": vb, "diff": _diff(va, vb)}
  averages = {}
  for n in names:
    ma, mb = _mean([ra[k][n] for k in both]), _mean([rb[k][n] for k in both])
    averages[n] = {"a": ma, "b": mb, "diff": _diff(ma, mb)}
  out = {"task": a["task"], "kind": a["kind"], "metrics": names,
         "a": {"path": os.path.abspath(a_path), "model": (a.get("model") or {}).get("path")},
         "b": {"path": os.path.abspath(b_path), "model": (b.get("model") or {}).get("path")},
         "rows": rows, "averages": averages, "sets_compared": both,
         "only_a": [k for k in ra if k not in rb], "only_b": [k for k in rb if k not in ra]}
  if "gxlt" in a and "gxlt" in b:
    pairs = {k: tuple(p) for k, p in a["gxlt"]["pairs"].items() if k in both}
    ga = report_lib.gxlt_table({k: ra[k] for k in pairs}, pairs)
    gb = report_lib.gxlt_table({k: rb[k] for k in pairs}, pairs)
    g = {"langs": ga["langs"], "pairs": ga["pairs"]}
    for n in ("f1", "exact_match"):
      g[n] = {"a": ga[n], "b": gb[n],
              "diff": [[_diff(x, y) for x, y in zip(r1, r2)] for r1, r2 in zip(ga[n], gb[n])]}
    for part in ("same_language", "mixed"):
      g[part] = {n: {"a": ga[part][n], "b": gb[part][n], "diff": _diff(ga[part][n], gb[part][n])}
                 for n in ("f1", "exact_match")}
      g[part]["pairs"] = ga[part]["pairs"]
    out["gxlt"] = g
  return out


def _signed(v) -> str:
  return "n/a" if v is None else f"{v:+.1f}"


def markdown(c: dict) -> str:
  fmt = report_lib.fmt
  names = c["metrics"]
  lines = [f"### {c['task']}: A vs B (diff = B - A)", "",
           f"- A: {c['a']['path']}" + (f" (model {c['a']['model']})" if c['a']['model'] else ""),
           f"- B: {c['b']['path']}" + (f" (model {c['b']['model']})" if c['b']['model'] else ""),
           ""]
  head = "| set | " + " | ".join(f"{report_lib.LABELS.get(n, n)} {s}" for n in names
                                 for s in ("A", "B", "diff")) + " |"
  lines += [head, "|---|" + "---:|" * (3 * len(names))]
  def row(label, cells):
    return f"| {label} | " + " | ".join(f"{fmt(v['a'])} | {fmt(v['b'])} | {_signed(v['diff'])}"
                                        for v in cells) + " |"
  lines += [row(k, [r[n] for n in names]) for k, r in c["rows"].items()]
  lines.append(row(f"**average** ({len(c['sets_compared'])} sets in both)",
                   [c["averages"][n] for n in names]))
  for side in ("only_a", "only_b"):
    if c[side]:
      lines.append(f"\nOnly in {side[-1].upper()} (not averaged): {', '.join(c[side])}")
  g = c.get("gxlt")
  if g:
    langs = g["langs"]
    lines += ["", "G-XLT F1, B - A (c = context language, q = question language):", "",
              "| | " + " | ".join(f"q={q}" for q in langs) + " |",
              "|---|" + "---:|" * len(langs)]
    lines += [f"| c={cl} | " + " | ".join(_signed(v) for v in r) + " |"
              for cl, r in zip(langs, g["f1"]["diff"])]
    lines.append("")
    for part, label in (("same_language", "same-language diagonal"), ("mixed", "mixed pairs")):
      s = g[part]
      lines.append(f"- {label} ({s['pairs']} pairs): F1 A {fmt(s['f1']['a'])}, "
                   f"B {fmt(s['f1']['b'])}, diff {_signed(s['f1']['diff'])}; EM A "
                   f"{fmt(s['exact_match']['a'])}, B {fmt(s['exact_match']['b'])}, "
                   f"diff {_signed(s['exact_match']['diff'])}")
  return "\n".join(lines) + "\n"


def heatmap(c: dict, path: str):
  """F1 heatmaps of A, B (0-100) and B - A (diverging, centred on 0), values written in."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  g = c["gxlt"]
  langs = g["langs"]
  def arr(m):
    return np.array([[np.nan if v is None else v for v in r] for r in m], np.float64)
  mats = [arr(g["f1"]["a"]), arr(g["f1"]["b"]), arr(g["f1"]["diff"])]
  lim = max(float(np.nanmax(np.abs(mats[2]))) if np.isfinite(mats[2]).any() else 0.0, 1.0)
  n = len(langs)
  fig, axes = plt.subplots(1, 3, figsize=(3 * (1.2 + 0.55 * n), 1.6 + 0.55 * n))
  titles = ("A: F1", "B: F1", "B - A: F1")
  for ax, m, title, k in zip(axes, mats, titles, range(3)):
    cmap = plt.get_cmap("RdBu" if k == 2 else "viridis").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-lim if k == 2 else 0,
                   vmax=lim if k == 2 else 100)
    ax.set_xticks(range(n), langs)
    ax.set_yticks(range(n), langs)
    ax.set_xlabel("question language")
    ax.set_ylabel("context language")
    ax.set_title(title)
    for i in range(n):
      for j in range(n):
        if np.isfinite(m[i, j]):
          dark = abs(m[i, j]) > 0.6 * lim if k == 2 else m[i, j] < 70
          ax.text(j, i, f"{m[i, j]:+.1f}" if k == 2 else f"{m[i, j]:.1f}", ha="center",
                  va="center", fontsize=7, color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  mixed = g["mixed"]["f1"]
  fig.suptitle(f"{c['task']} G-XLT F1; mixed-pair mean A {report_lib.fmt(mixed['a'])}, "
               f"B {report_lib.fmt(mixed['b'])} ({g['mixed']['pairs']} pairs)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(a_path: str, b_path: str, out: str, task: str | None = None) -> list[str]:
  """Writes compare-<task>.json / .md (and -gxlt.png) under `out`; never overwrites.
  -> the paths written."""
  a, b = load_reports(a_path), load_reports(b_path)
  tasks = pick(a, b, a_path, b_path, task)
  comparisons = {t: compare(a[t][1], b[t][1], a[t][0], b[t][0]) for t in tasks}
  planned = {}
  for t, c in comparisons.items():
    stem = os.path.join(out, _OUTPUT_PREFIX + t.replace("/", "_"))
    planned[t] = [stem + ".json", stem + ".md"] + ([stem + "-gxlt.png"] if "gxlt" in c else [])
  if any("gxlt" in c for c in comparisons.values()):
    try:
      import matplotlib  # noqa: F401 -- checked before anything is written
    except ImportError:
      hint = "pip install 'bepa-jax[plots]'"
      raise InputError(f"the G-XLT heatmap needs matplotlib: {hint}") from None
  taken = [p for paths in planned.values() for p in paths if os.path.exists(p)]
  if taken:
    raise InputError(f"{taken[0]} exists (nothing overwritten): pick another --out")
  os.makedirs(out, exist_ok=True)
  written = []
  for t, c in comparisons.items():
    paths = planned[t]
    with open(paths[0], "w") as f:
      json.dump(c, f, indent=2)
    md = markdown(c)
    with open(paths[1], "w") as f:
      f.write(md)
    if "gxlt" in c:
      heatmap(c, paths[2])
    print(md)
    written += paths
  return written
