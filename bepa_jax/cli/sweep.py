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
OUT/sweep_*.png after every run. The grid, tables and plots are bepa_jax/sweep.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
import time

from bepa_jax import sweep as sweep_lib
from bepa_jax.cli import common as cli
from bepa_jax.errors import BepaError, one_line
from bepa_jax.sweep import SweepError

PROG = "bepa-sweep"
log = logging.getLogger("bepa.sweep")


# ----------------------------------------------------------------------------- checks
def check_runs(config: str, axes, fixed: dict[str, str], num_devices: int | None = None,
               validate: bool = True) -> None:
  """Before the first run: every grid and --set value parsed against the config's field type,
  then (`validate`) every run's config checked as bepa-train checks it, on `num_devices` (None:
  the fewest its mesh fits). A bad value fails the sweep in seconds, not after the runs before
  it have trained; the SweepError names the key and the value."""
  from bepa_jax.config import load as config_load
  from bepa_jax.trainer import build as build_lib
  sweep_lib.check_types(config, axes, fixed)
  for point in sweep_lib.expand_grid(axes) if validate else ():
    try:
      run_config = config_load.load_config(config, sweep_lib.overrides(point, fixed))
      build_lib.check_config(run_config, num_devices or sweep_lib.min_devices(run_config.mesh))
    except BepaError as e:
      where = ", ".join(f"{k}={v}" for k, v in point.items())
      raise SweepError(f"run {sweep_lib.run_name(point)} ({where}): {one_line(e)}") from None


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
def evaluate(workdir: str, sets, batch_size: int) -> dict:
  """Held-out metrics of a finished run's final params (bepa_jax.eval)."""
  from bepa_jax import loading
  from bepa_jax import mesh as mesh_lib
  from bepa_jax.eval import embed, suite
  loaded = loading.load_workdir(workdir)
  mesh, mesh_cfg = embed.inference_mesh(loaded.mesh_cfg)
  params = embed.shard_params(loaded.model, loaded.params, mesh, mesh_cfg, loaded.max_length)
  embedder = embed.Embedder(loaded.model, params, loaded.tokenizer, mesh,
                            max_length=loaded.max_length, batch_size=batch_size,
                            rules=mesh_lib.rules(mesh_cfg))
  report, _ = suite.run(embedder, sets, poolings=("cls",))
  return sweep_lib.run_metrics(report)


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


def train_and_evaluate(args, point: dict, name: str, flags: list[str], sets, where: str) -> dict:
  """One run: bepa-train in a child process (its output in train.log), then the held-out
  evaluation of its final params; -> its table row (status "ok" or why not)."""
  workdir = os.path.join(args.out, "runs", name)
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
    row["status"] = f"failed (exit {rc})"
    log.error("run %s failed (exit %d): %s [see %s]", name, rc,
              sweep_lib.log_tail(os.path.join(workdir, "train.log")),
              os.path.join(workdir, "train.log"))
    return row
  try:
    row.update(sweep_lib.final_train_metrics(workdir))
    ev = evaluate(workdir, sets, args.eval_batch_size)
    row.update(ev)
    row["status"] = "ok"
    log.info("run %s %s: retrieval %.1f%% | effective rank %.2f | PC1 %.1f%% | %.0f s",
             where, name, 100 * ev["retrieval_acc"], ev["effective_rank"],
             100 * ev["pc1_share"], train_s)
    sweep_lib.save_row(workdir, flags, row)
  except BepaError as e:
    row["status"] = "eval failed"
    log.error("run %s: evaluation failed: %s", name, e)
  return row


def run_all(args, axes, fixed: dict, sets) -> list[dict]:
  """Every grid point in turn (a finished one is read back, not rerun); the tables are
  rewritten after each run, so an interrupted sweep leaves the rows it has."""
  keys = [k for k, _ in axes]
  points = sweep_lib.expand_grid(axes)
  meta = sweep_lib.meta(args.config, axes, fixed, sets)
  rows, trained_s, trained_n = [], 0.0, 0
  for i, point in enumerate(points, start=1):
    name, flags = sweep_lib.run_name(point), sweep_lib.overrides(point, fixed)
    saved = sweep_lib.saved_row(os.path.join(args.out, "runs", name), flags)
    if saved is not None:
      log.info("run %d/%d %s: finished before, skipped", i, len(points), name)
      rows.append(saved)
      continue
    eta = f"{trained_s / trained_n * (len(points) - i + 1) / 60:.1f} min" if trained_n else "?"
    log.info("run %d/%d %s ... ETA %s", i, len(points), name, eta)
    t0 = time.perf_counter()
    rows.append(train_and_evaluate(args, point, name, flags, sets, f"{i}/{len(points)}"))
    trained_s, trained_n = trained_s + time.perf_counter() - t0, trained_n + 1
    sweep_lib.write_tables(args.out, keys, rows, meta)
  sweep_lib.write_tables(args.out, keys, rows, meta)
  return rows


def summarise(args, keys: list[str], rows: list[dict]) -> int:
  """Plots, the table on stdout, then what was written where and the next command."""
  pngs = sweep_lib.write_plots(args.out, keys, rows)
  log.info("wrote %s", ", ".join(os.path.join(args.out, f) for f in
                                 list(sweep_lib.OUTPUTS) + [os.path.basename(p) for p in pngs]))
  with open(os.path.join(args.out, "sweep.md")) as f:
    print(f.read())
  best = sweep_lib.best_run(rows)
  line = (f"{PROG}: wrote {os.path.join(args.out, 'sweep')}.{{csv,md,json}} and {len(pngs)} "
          f"plots; runs in {os.path.join(args.out, 'runs')}/")
  if best:
    best_dir = os.path.join(args.out, "runs", best["name"])
    line += (f"; best held-out retrieval {100 * best['retrieval_acc']:.1f}% ({best['name']}); "
             f"next: `bepa-eval --workdir {best_dir} --tatoeba DIR` or "
             f"`bepa-transfer --workdir {best_dir} --task xnli`")
  print(line)
  failed = sum(r["status"] != "ok" for r in rows)
  if failed:
    print(f"{PROG}: error: {failed} of {len(rows)} runs failed", file=sys.stderr)
    return 1
  return 0


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    axes, fixed = sweep_lib.parse_plan(args.grid, args.set, args.steps)
    sweep_lib.check_keys(args.config, [k for k, _ in axes] + list(fixed))
    # Pod runs' devices and files (init.hf_dir, eval sets) are the pod's: only types here.
    local = args.backend == "local"
    check_runs(args.config, axes, fixed, local_device_count() if local else None, validate=local)
  except BepaError as e:
    return cli.fail(PROG, e)
  points = sweep_lib.expand_grid(axes)
  if args.backend == "print":
    for point in points:
      print(shlex.join(pod_command(args, sweep_lib.run_name(point),
                                   sweep_lib.overrides(point, fixed))))
    print(f"{PROG}: {len(points)} pod commands above, nothing ran; add --dry-run after "
          f"launch/tpu.py to see the gcloud lines", file=sys.stderr)
    return 0

  _setup_logging()
  try:
    sets = sweep_lib.eval_sets(args.eval_langs, args.eval_parallel, args.eval_tatoeba,
                               args.eval_max_sentences, args.heldout)
  except BepaError as e:
    return cli.fail(PROG, e)
  os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
  n_eval = sum(len(s) for s in sets)
  log.info("%d runs, %d held-out sentences per language; outputs in %s", len(points),
           n_eval // max(len(sets), 1), args.out)
  rows = run_all(args, axes, fixed, sets)
  return summarise(args, [k for k, _ in axes], rows)


run = cli.entry(main)


if __name__ == "__main__":
  run()
