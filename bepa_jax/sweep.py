"""The library of `bepa-sweep` (bepa_jax/cli/sweep.py starts the runs): the grid, the held-out
sets, each run's saved result and metrics, and the tables and plots of the whole sweep.

Nothing here trains or loads a model, so the pieces can be tested (and reused by bench/) without
starting a run.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re

from bepa_jax.errors import BepaError, ConfigError

RESULT = "sweep_result.json"

# Columns of sweep.csv / sweep.md after the grid keys (label, format for the Markdown table).
METRICS = (
    ("retrieval_acc", "held-out retrieval (top-1, %)", "pct"),
    ("effective_rank", "effective rank", "{:.2f}"),
    ("pc1_share", "PC1 share (%)", "pct"),
    ("gap", "cos gap", "{:.3f}"),
    ("inbatch_acc", "in-batch acc (%)", "pct"),
    ("loss", "final loss", "{:.3f}"),
    ("contrastive_loss", "InfoNCE", "{:.3f}"),
    ("train_s", "train s", "{:.0f}"),
)
PLOTTED = (("retrieval_acc", "held-out top-1 retrieval accuracy"),
           ("effective_rank", "effective rank of [CLS]"),
           ("pc1_share", "PC1 variance share of [CLS]"))
OUTPUTS = ("sweep.csv", "sweep.md", "sweep.json")


class SweepError(ConfigError):
  """Bad command line (a grid, --set or evaluation flag): printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- grid
def parse_assignment(text: str, flag: str, multi: bool) -> tuple[str, list[str]]:
  """'a.b=1,2' -> ('a.b', ['1', '2']) (multi) or ('a.b', ['1,2'])."""
  key, sep, values = text.partition("=")
  key = key.strip()
  if key.startswith("config."):
    key = key[len("config."):]
  if not sep or not key:
    raise SweepError(f"{flag} {text!r}: expected KEY=VALUE{',VALUE...' if multi else ''}")
  vals = [v.strip() for v in values.split(",")] if multi else [values]
  if not values.strip() or (multi and any(not v for v in vals)):
    raise SweepError(f"{flag} {text!r}: empty value list for '{key}'")
  return key, vals


def parse_plan(grid: list[str], sets: list[str], steps: int | None):
  """--grid / --set / --steps -> (axes [(key, values)], fixed {key: value}); a key given twice
  is an error (the later one would silently win)."""
  axes = [parse_assignment(g, "--grid", multi=True) for g in grid]
  fixed = {k: v[0] for k, v in (parse_assignment(s, "--set", multi=False) for s in sets)}
  if steps is not None:
    fixed["train.steps"] = str(steps)
  keys = [k for k, _ in axes]
  dup = sorted({k for k in keys if keys.count(k) > 1} | (set(keys) & set(fixed)))
  if dup:
    raise SweepError(f"key '{dup[0]}' is given more than once (--grid / --set / --steps)")
  return axes, fixed


def expand_grid(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
  """Cartesian product, the first axis varying slowest."""
  keys = [k for k, _ in axes]
  return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]


def run_name(point: dict[str, str]) -> str:
  """{'train.global_batch': '16', 'loss.negatives': 'local'} -> 'global_batch-16_negatives-local'
  (the full key where two keys share their last part)."""
  leaves = [k.rsplit(".", 1)[-1] for k in point]
  parts = []
  for (key, value), leaf in zip(point.items(), leaves):
    label = leaf if leaves.count(leaf) == 1 else key
    parts.append(f"{label}-{re.sub(r'[^A-Za-z0-9.+-]', '-', value)}")
  return "_".join(parts)


def overrides(point: dict[str, str], fixed: dict[str, str]) -> list[str]:
  merged = {**fixed, **point}
  return [f"--config.{k}={v}" for k, v in merged.items()]


def check_keys(config: str, keys) -> None:
  """Unknown keys (or a missing config file) -> ConfigError, as bepa-train reports them."""
  from bepa_jax.config import load as config_load
  config_load.check_override_keys(["--config", config] + [f"--config.{k}=0" for k in keys])


def check_types(config: str, axes, fixed: dict[str, str]) -> None:
  """Every grid and --set value parsed against the config's field type: the SweepError names
  the flag, the key and the value."""
  from bepa_jax.config import load as config_load
  base = config_load.check_override_keys(["--config", config])
  given = [("--grid", k, vs) for k, vs in axes] + [("--set", k, [v]) for k, v in fixed.items()]
  for flag, key, values in given:
    for value in values:
      try:
        config_load.load_config(config, [f"--config.{key}={value}"])
      except BepaError:
        raise SweepError(f"{flag} {key}={','.join(values)}: config key {key} expects "
                         f"{config_load.expected_type(base, key)}, got {value!r}") from None


def min_devices(mesh) -> int:
  """The fewest devices a mesh config fits (each -1 axis of size 1)."""
  sizes = [int(mesh.data), int(mesh.fsdp), int(mesh.tensor)]
  return max(int(mesh.dcn_data), 1) * math.prod(s for s in sizes if s > 0)


# ----------------------------------------------------------------------------- evaluation
def eval_sets(langs: str = "", parallel=(), tatoeba: str | None = None,
              max_sentences: int = 0, heldout: int = 100):
  """The held-out aligned sets: the given files, or the last `heldout` meanings of the bundled
  corpus (in `langs`, comma-separated; default all)."""
  from bepa_jax.data import corpus as corpus_lib
  from bepa_jax.eval import retrieval, suite
  langs = [l.strip() for l in langs.split(",") if l.strip()]
  if parallel or tatoeba:
    return suite.load_sets(tatoeba, langs, parallel, max_sentences or None)
  corpus = corpus_lib.load_embedded()
  if langs:
    try:
      corpus = corpus.select(langs)
    except ValueError as e:
      raise SweepError(f"--eval-langs: {e}") from None
  rows = corpus.rows[-heldout:]
  columns = tuple(tuple(r[j] for r in rows) for j in range(len(corpus.languages)))
  return [retrieval.ParallelSet("embedded_tail", corpus.languages, columns)]


def mean_retrieval(ret: dict) -> tuple[float, dict]:
  """Mean [CLS] top-1 accuracy over every set, pair and direction (+ the per-direction values)."""
  per = {}
  for set_name, pairs in ret.items():
    if set_name == "tatoeba_average":
      continue
    if set_name == "tatoeba":
      for lang, entry in pairs.items():
        for direction, acc in entry[f"{lang}-eng"]["cls"].items():
          per[f"tatoeba/{direction}"] = acc
      continue
    for entry in pairs.values():
      for direction, acc in entry["cls"].items():
        per[f"{set_name}/{direction}"] = acc
  return (float(sum(per.values()) / len(per)) if per else float("nan")), per


def run_metrics(report: dict) -> dict:
  """A suite report (bepa_jax.eval.suite.run, [CLS] pooling) -> the sweep's held-out columns."""
  acc, per = mean_retrieval(report["retrieval"])
  d = report["diagnostics"]["cls"]
  return {"retrieval_acc": acc, "effective_rank": d["effective_rank"],
          "pc1_share": d["pc1_share"], "gap": d["gap"], "retrieval": per}


def final_train_metrics(workdir: str) -> dict:
  """The last train/* record of metrics.jsonl (as bepa-train logged it): loss, in-batch acc."""
  last = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        rec = json.loads(line)
        if "train/loss" in rec:
          last = rec
  out = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("train/")}
  if "acc_x2y" in out and "acc_y2x" in out:
    out["inbatch_acc"] = (out["acc_x2y"] + out["acc_y2x"]) / 2
  out["final_step"] = last.get("step")
  return out


def saved_row(workdir: str, flags: list[str]) -> dict | None:
  """The row a finished run saved, if it ran with the same overrides (a rerun resumes)."""
  path = os.path.join(workdir, RESULT)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  return saved["row"] if saved.get("overrides") == flags else None


def save_row(workdir: str, flags: list[str], row: dict) -> None:
  with open(os.path.join(workdir, RESULT), "w") as f:
    json.dump({"overrides": flags, "row": row}, f, indent=2)


def log_tail(path: str) -> str:
  """The line of a failed run's log that says why: its last error line, else its last line."""
  try:
    with open(path, errors="replace") as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    return ""
  lines = [l for l in lines if not l.startswith("@")]  # native stack frames say nothing
  errors = [l for l in lines if "error" in l.lower() or re.match(r"F\d{4} ", l)]
  return (errors or lines or [""])[-1][:300]


# ----------------------------------------------------------------------------- outputs
def meta(config: str, axes, fixed: dict[str, str], sets) -> dict:
  """sweep.json's header; its note ends sweep.md (what the columns are measured on)."""
  described = ", ".join(f"{s.name} ({len(s)} x {len(s.languages)} langs)" for s in sets)
  return {"config": config, "grid": {k: v for k, v in axes}, "set": fixed,
          "eval_sets": [{"name": s.name, "languages": list(s.languages), "sentences": len(s)}
                        for s in sets],
          "note": (f"Held-out set: {described}; "
                   f"retrieval = mean top-1 [CLS] accuracy over all directions; "
                   f"in-batch acc / final loss = the last logged training metrics (x->y, y->x "
                   f"mean; over the run's own negative pool, whose size differs between runs).")}


def _fmt(value, fmt: str) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  return f"{100 * value:.1f}" if fmt == "pct" else fmt.format(value)


def write_tables(out: str, keys: list[str], rows: list[dict], meta: dict) -> None:
  cols = ["name", *keys, "status", *(m for m, _, _ in METRICS)]
  with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow({c: r.get(c, "") for c in cols})
  head = [*keys, *(label for _, label, _ in METRICS)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [str(r[k]) for k in keys]
    cells += ([_fmt(r.get(m), fmt) for m, _, fmt in METRICS] if r["status"] == "ok"
              else [r["status"]] + [""] * (len(METRICS) - 1))
    lines.append("| " + " | ".join(cells) + " |")
  with open(os.path.join(out, "sweep.md"), "w") as f:
    f.write("\n".join(lines) + "\n\n" + meta.get("note", "") + "\n")
  with open(os.path.join(out, "sweep.json"), "w") as f:
    json.dump({**meta, "runs": rows}, f, indent=2)


def _as_numbers(values):
  try:
    return [float(v) for v in values]
  except ValueError:
    return None


def write_plots(out: str, keys: list[str], rows: list[dict]) -> list[str]:
  """One PNG per metric: x = the first grid axis, one line per value of the other axes."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  done = [r for r in rows if r["status"] == "ok"]
  if not done:
    return []
  x_key, line_keys = keys[0], keys[1:]
  x_values = list(dict.fromkeys(r[x_key] for r in rows))
  numeric = _as_numbers(x_values)
  positions = dict(zip(x_values, numeric if numeric else range(len(x_values))))
  groups: dict = {}
  for r in done:
    groups.setdefault(tuple(r[k] for k in line_keys), []).append(r)
  paths = []
  for metric, title in PLOTTED:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for group, members in groups.items():
      members = sorted(members, key=lambda r: positions[r[x_key]])
      label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(line_keys, group))
      ax.plot([positions[r[x_key]] for r in members], [r[metric] for r in members], "o-",
              label=label or None)
    if numeric and min(numeric) > 0 and max(numeric) / min(numeric) >= 8:
      ax.set_xscale("log", base=2)
    ax.set_xticks(list(positions.values()))
    ax.set_xticklabels(x_values)
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.set_title(title)
    if line_keys:
      ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.join(out, f"sweep_{metric}.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  return paths


def best_run(rows: list[dict]) -> dict | None:
  """The finished run with the highest held-out retrieval accuracy (None if none finished)."""
  done = [r for r in rows if r.get("status") == "ok"
          and not math.isnan(float(r.get("retrieval_acc", float("nan"))))]
  return max(done, key=lambda r: r["retrieval_acc"]) if done else None
