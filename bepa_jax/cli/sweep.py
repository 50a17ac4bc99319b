"""`bepa-sweep`: a grid of short bepa-train runs, each evaluated, summarised as a table and plots.

  bepa-sweep --config configs/quickstart.py --grid 'train.global_batch=16,64' \
      --grid 'loss.negatives=global,local' --set train.steps=200 --out runs/sweep
  bepa-sweep ... --backend print --tpu-name bepa --zone us-central2-b \
      --accelerator-type v4-32 --gcs-root gs://BUCKET/sweep     (pod commands, nothing runs)

Runs are the Cartesian product of the --grid axes; each is its own `python -m bepa_jax.cli.train`
process (clean JAX state, same XLA_FLAGS), one after the other, in OUT/runs/<name>. A run
whose workdir holds sweep_result.json for the same overrides is skipped, so a rerun resumes.
After training, the run's final params are evaluated on a held-out aligned set (by default
the last --heldout meanings of the bundled corpus, which `data.source=embedded` runs also
train on; give --eval-parallel or --eval-tatoeba for truly unseen text): top-1 [CLS]
retrieval accuracy, effective rank and PC1 share. Writes OUT/sweep.{csv,md,json} and
OUT/sweep_*.png after every run.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import time

from bepa_jax.cli import common as cli

PROG = "bepa-sweep"
RESULT = "sweep_result.json"
log = logging.getLogger("bepa.sweep")

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


class SweepError(ValueError):
  """Bad command line: printed as one line, exit status 2."""


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


def check_runs(config: str, axes, fixed: dict[str, str], num_devices: int | None = None,
               validate: bool = True) -> None:
  """Before the first run: every grid and --set value parsed against the config's field type,
  then (`validate`) every run's config checked as bepa-train checks it, on `num_devices` (None:
  the fewest its mesh fits). A bad value fails the sweep in seconds, not after the runs before
  it have trained; the SweepError names the key and the value."""
  from bepa_jax.config import load as config_load
  from bepa_jax.trainer import build as build_lib
  from bepa_jax.errors import BepaError
  base = config_load.check_override_keys(["--config", config])
  given = [("--grid", k, vs) for k, vs in axes] + [("--set", k, [v]) for k, v in fixed.items()]
  for flag, key, values in given:
    for value in values:
      try:
        config_load.load_config(config, [f"--config.{key}={value}"])
      except BepaError:
        raise SweepError(f"{flag} {key}={','.join(values)}: config key {key} expects "
                         f"{config_load.expected_type(base, key)}, got {value!r}") from None
  for point in expand_grid(axes) if validate else ():
    try:
      run_config = config_load.load_config(config, overrides(point, fixed))
      build_lib.check_config(run_config, num_devices or min_devices(run_config.mesh))
    except BepaError as e:
      where = ", ".join(f"{k}={v}" for k, v in point.items())
      raise SweepError(f"run {run_name(point)} ({where}): {cli.one_line(e)}") from None


def min_devices(mesh) -> int:
  """The fewest devices a mesh config fits (each -1 axis of size 1)."""
  sizes = [int(mesh.data), int(mesh.fsdp), int(mesh.tensor)]
  return max(int(mesh.dcn_data), 1) * math.prod(s for s in sizes if s > 0)


def local_device_count() -> int | None:
  """The devices a local run will see, counted in a child process like the runs: the sweep itself
  must not start the accelerator (it would hold the TPU chips, or GPU memory, the runs need)."""
  try:
    r = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                       capture_output=True, text=True, timeout=600)
    return int(r.stdout.split()[-1])
  except (OSError, subprocess.SubprocessError, ValueError, IndexError):
    return None


# ----------------------------------------------------------------------------- commands
def local_command(config: str, workdir: str, flags: list[str]) -> list[str]:
  return [sys.executable, "-m", "bepa_jax.cli.train", "--config", config, "--workdir", workdir,
          *flags]


def pod_command(args, name: str, flags: list[str]) -> list[str]:
  """launch/tpu.py's train form (add --dry-run to it to see the gcloud line)."""
  cmd = ["python", "launch/tpu.py", "--name", args.tpu_name, "--zone", args.zone]
  if args.project:
    cmd += ["--project", args.project]
  if args.accelerator_type:
    cmd += ["--accelerator-type", args.accelerator_type]
  return cmd + ["train", "--config", args.config, "--workdir",
                f"{args.gcs_root.rstrip('/')}/runs/{name}", *flags]


# ----------------------------------------------------------------------------- evaluation
def eval_sets(args):
  from bepa_jax.data import corpus as corpus_lib
  from bepa_jax.eval import retrieval, suite
  langs = [l.strip() for l in args.eval_langs.split(",") if l.strip()]
  cap = args.eval_max_sentences or None
  if args.eval_parallel or args.eval_tatoeba:
    return suite.load_sets(args.eval_tatoeba, langs, args.eval_parallel, cap)
  corpus = corpus_lib.load_embedded()
  if langs:
    try:
      corpus = corpus.select(langs)
    except ValueError as e:
      raise SweepError(f"--eval-langs: {e}") from None
  rows = corpus.rows[-args.heldout:]
  columns = tuple(tuple(r[j] for r in rows) for j in range(len(corpus.languages)))
  return [retrieval.ParallelSet("embedded_tail", corpus.languages, columns)]


def _mean_retrieval(ret: dict) -> tuple[float, dict]:
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


def evaluate(workdir: str, sets, batch_size: int) -> dict:
  """Held-out metrics of a finished run's final params (bepa_jax.eval)."""
  from bepa_jax import mesh as mesh_lib
  from bepa_jax import loading
  from bepa_jax.eval import embed, suite
  loaded = loading.load_workdir(workdir)
  mesh, mesh_cfg = embed.inference_mesh(loaded.mesh_cfg)
  params = embed.shard_params(loaded.model, loaded.params, mesh, mesh_cfg, loaded.max_length)
  embedder = embed.Embedder(loaded.model, params, loaded.tokenizer, mesh,
                            max_length=loaded.max_length, batch_size=batch_size,
                            rules=mesh_lib.rules(mesh_cfg))
  report, _ = suite.run(embedder, sets, poolings=("cls",))
  acc, per = _mean_retrieval(report["retrieval"])
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


# ----------------------------------------------------------------------------- outputs
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


# ----------------------------------------------------------------------------- CLI
def parse_args(argv):
  p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, help="config file with get_config()")
  p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                 help="a grid axis (repeatable; the runs are the Cartesian product)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override shared by every run (repeatable)")
  p.add_argument("--steps", type=int, help="shorthand for --set train.steps=N")
  p.add_argument("--out", required=True, help="sweep dir: runs/<name>/, sweep.csv/.md/.json/*.png")
  p.add_argument("--backend", choices=("local", "print"), default="local",
                 help="local: train + evaluate here; print: print each run's pod command")
  e = p.add_argument_group("evaluation (local backend)")
  e.add_argument("--heldout", type=int, default=100,
                 help="last N meanings of the bundled corpus (when no --eval-* set is given)")
  e.add_argument("--eval-parallel", nargs="+", default=[], metavar="FILE",
                 help="line-aligned files (.gz ok), language = last suffix")
  e.add_argument("--eval-tatoeba", help="LASER-layout Tatoeba dir")
  e.add_argument("--eval-langs", default="",
                 help="Tatoeba languages, or bundled-corpus languages (default: all)")
  e.add_argument("--eval-max-sentences", type=int, default=1000, help="per set (0 = all)")
  e.add_argument("--eval-batch-size", type=int, default=64)
  t = p.add_argument_group("pods (print backend)")
  t.add_argument("--tpu-name")
  t.add_argument("--zone", default=os.environ.get("CLOUDSDK_COMPUTE_ZONE"))
  t.add_argument("--project")
  t.add_argument("--accelerator-type")
  t.add_argument("--gcs-root", help="gs://BUCKET/PATH: runs go to <root>/runs/<name>")
  args = p.parse_args(argv)
  if not args.grid:
    p.error("give at least one --grid KEY=V1,V2,...")
  if len(args.eval_parallel) == 1:
    p.error("--eval-parallel needs at least 2 aligned files")
  if args.heldout < 2 or args.eval_max_sentences < 0 or args.eval_batch_size < 1:
    p.error("--heldout must be >= 2, --eval-max-sentences >= 0, --eval-batch-size >= 1")
  if args.steps is not None and args.steps < 1:
    p.error("--steps must be >= 1")
  if args.backend == "print":
    missing = [f for f in ("tpu_name", "zone", "gcs_root") if not getattr(args, f)]
    if missing:
      p.error("--backend print needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
    if not args.gcs_root.startswith("gs://"):
      p.error(f"--gcs-root must be a gs:// path shared by the pod's workers, got {args.gcs_root!r}")
  return args


def _setup_logging():
  cli.setup_logging()
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's per-restore metadata warnings


def _tail(path: str) -> str:
  try:
    with open(path, errors="replace") as f:
      lines = [l.strip() for l in f if l.strip()]
  except OSError:
    return ""
  lines = [l for l in lines if not l.startswith("@")]  # native stack frames say nothing
  errors = [l for l in lines if "error" in l.lower() or re.match(r"F\d{4} ", l)]
  return (errors or lines or [""])[-1][:300]


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from bepa_jax.errors import BepaError
  try:
    axes = [parse_assignment(g, "--grid", multi=True) for g in args.grid]
    fixed = dict(parse_assignment(s, "--set", multi=False) for s in args.set)
    fixed = {k: v[0] for k, v in fixed.items()}
    if args.steps is not None:
      fixed["train.steps"] = str(args.steps)
    keys = [k for k, _ in axes]
    dup = sorted({k for k in keys if keys.count(k) > 1} | (set(keys) & set(fixed)))
    if dup:
      raise SweepError(f"key '{dup[0]}' is given more than once (--grid / --set / --steps)")
    check_keys(args.config, keys + list(fixed))
    # Pod runs' devices and files (init.hf_dir, eval sets) are the pod's: only types here.
    local = args.backend == "local"
    check_runs(args.config, axes, fixed, local_device_count() if local else None, validate=local)
  except (SweepError, BepaError) as e:
    return cli.fail(PROG, e)
  points = expand_grid(axes)
  names = [run_name(p) for p in points]

  if args.backend == "print":
    for point, name in zip(points, names):
      print(shlex.join(pod_command(args, name, overrides(point, fixed))))
    return 0

  _setup_logging()
  try:
    sets = eval_sets(args)
  except (SweepError, BepaError) as e:
    return cli.fail(PROG, e)
  os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
  n_eval = sum(len(s) for s in sets)
  described = ", ".join(f"{s.name} ({len(s)} x {len(s.languages)} langs)" for s in sets)
  meta = {"config": args.config, "grid": {k: v for k, v in axes}, "set": fixed,
          "eval_sets": [{"name": s.name, "languages": list(s.languages), "sentences": len(s)}
                        for s in sets],
          "note": (f"Held-out set: {described}; "
                   f"retrieval = mean top-1 [CLS] accuracy over all directions; "
                   f"in-batch acc / final loss = the last logged training metrics (x->y, y->x "
                   f"mean; over the run's own negative pool, whose size differs between runs).")}
  log.info("%d runs, %d held-out sentences per language; outputs in %s", len(points),
           n_eval // max(len(sets), 1), args.out)
  rows, trained_s, trained_n, failed = [], 0.0, 0, 0
  for i, (point, name) in enumerate(zip(points, names), start=1):
    flags = overrides(point, fixed)
    workdir = os.path.join(args.out, "runs", name)
    result_path = os.path.join(workdir, RESULT)
    left = len(points) - i + 1
    eta = f"{trained_s / trained_n * left / 60:.1f} min" if trained_n else "?"
    if os.path.isfile(result_path):
      with open(result_path) as f:
        saved = json.load(f)
      if saved.get("overrides") == flags:
        log.info("run %d/%d %s: finished before, skipped", i, len(points), name)
        rows.append(saved["row"])
        continue
    log.info("run %d/%d %s ... ETA %s", i, len(points), name, eta)
    os.makedirs(workdir, exist_ok=True)
    cmd = local_command(args.config, workdir, flags)
    t0 = time.perf_counter()
    with open(os.path.join(workdir, "train.log"), "w") as logf:
      logf.write(shlex.join(cmd) + "\n")
      logf.flush()
      rc = subprocess.call(cmd, stdout=logf, stderr=subprocess.STDOUT)
    train_s = time.perf_counter() - t0
    row = {"name": name, **point, "train_s": train_s}
    if rc != 0:
      failed += 1
      row["status"] = f"failed (exit {rc})"
      log.error("run %s failed (exit %d): %s [see %s]", name, rc,
                _tail(os.path.join(workdir, "train.log")), os.path.join(workdir, "train.log"))
    else:
      try:
        row.update(final_train_metrics(workdir))
        ev = evaluate(workdir, sets, args.eval_batch_size)
        row.update(ev)
        row["status"] = "ok"
        log.info("run %d/%d %s: retrieval %.1f%% | effective rank %.2f | PC1 %.1f%% | %.0f s",
                 i, len(points), name, 100 * ev["retrieval_acc"], ev["effective_rank"],
                 100 * ev["pc1_share"], train_s)
        with open(result_path, "w") as f:
          json.dump({"overrides": flags, "row": row}, f, indent=2)
      except BepaError as e:
        failed += 1
        row["status"] = "eval failed"
        log.error("run %s: evaluation failed: %s", name, e)
    rows.append(row)
    trained_s, trained_n = trained_s + time.perf_counter() - t0, trained_n + 1
    write_tables(args.out, keys, rows, meta)
  write_tables(args.out, keys, rows, meta)
  pngs = write_plots(args.out, keys, rows)
  log.info("wrote %s", ", ".join(os.path.join(args.out, f) for f in
                                 ["sweep.csv", "sweep.md", "sweep.json"] +
                                 [os.path.basename(p) for p in pngs]))
  with open(os.path.join(args.out, "sweep.md")) as f:
    print(f.read())
  if failed:
    print(f"{PROG}: error: {failed} of {len(points)} runs failed", file=sys.stderr)
    return 1
  return 0


run = cli.entry(main)


if __name__ == "__main__":
  run()
