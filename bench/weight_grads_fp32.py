"""What model.weight_grads_fp32 costs on a pod: pod-table cells' fastest plans compiled with it
and without it (XLA:TPU on this CPU, roofline figures: no TPU runs).

  python bench/weight_grads_fp32.py [--cells base_4096_v5e-64_padded,...]

Each cell's plan is the one bench/results/aot_table.json ranks first, compiled by `bepa-compile`
as the table does (bench/aot_table.py's arguments), once as it is and once with
--config.model.weight_grads_fp32=True. Reported: step time and its HBM / ICI / compute terms,
memory per chip, ICI bytes per chip, and the dtypes of the backward pass's cross-chip sums of
2+-dimensional arrays (the weight gradients). Compiles are kept in bench/results/weight_grads_fp32/
(rerun to redo one: delete its file). Writes bench/results/weight_grads_fp32.json and .png.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
import aot_table  # noqa: E402  (bench/ is not a package)
from bepa_jax.aot import search  # noqa: E402

RESULTS = os.path.join(REPO, "bench", "results")
CELLS = "base_4096_v5e-64_padded,xlmr_4096_v5e-64_padded,base_4096_v5e-256_packed"


def best_plan(table: dict, name: str):
  config, B, topo, layout = name.split("_")
  row = next(r for r in table["rows"] if (r["config"], r["B"], r["slice"]) == (config, int(B), topo)
             and r["layout"].split()[0] == layout)
  return (config, int(B), topo, layout == "packed"), row["best"]


def weight_grad_sums(report: dict) -> dict:
  """dtype -> count of the backward's sums of 2+-D arrays over the batch chips (data x fsdp):
  the weight gradients. Not the tensor axis's sums (activation gradients, bf16 by design) nor
  the contrastive shard_map's (fp32 by construction)."""
  batch_chips = report["mesh"]["data"] * report["mesh"]["fsdp"]
  out = collections.Counter()
  for c in report["collectives"]:
    if (c["kind"] in ("all-reduce", "reduce-scatter") and "transpose" in c["op_name"]
        and "shard_map" not in c["op_name"] and c["group"] == batch_chips):
      out.update(a.split("[")[0] for a in c["arrays"] if a.count(",") >= 1)
  return dict(out)


def summary(report: dict) -> dict:
  t = report["time"]
  return dict(step_ms=1e3 * t["step_s"], bound=t["bound"], hbm_ms=1e3 * t["hbm_s"],
              ici_ms=1e3 * t["ici_s"], compute_ms=1e3 * t["compute_s"],
              gib_per_chip=report["memory"]["total"] / 2**30,
              ici_gb_per_chip=report["ici_bytes_per_chip"] / 1e9,
              weight_grad_sums=weight_grad_sums(report))


def compile_cell(name: str, cell, best: dict, on: bool, out_dir: str) -> dict:
  path = os.path.join(out_dir, f"{name}_{'fp32' if on else 'today'}.json")
  if not os.path.exists(path):
    args = aot_table.args_for(cell, search.Plan.from_key(best["plan_key"]))
    cmd = [sys.executable, "-m", "bepa_jax.cli.compile", *args, "--out", path]
    cmd += ["--config.model.weight_grads_fp32=True"] if on else []
    print(f"compiling {name} ({best['plan']}), weight_grads_fp32={on} ...", flush=True)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
      raise SystemExit(f"bepa-compile failed for {name}: {done.stderr.strip().splitlines()[-1]}")
  return summary(json.load(open(path)))


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  x = list(range(len(rows)))
  names = [r["cell"].replace("_", " ") for r in rows]
  bars = axes[0].bar(x, [r["step_ratio"] for r in rows], 0.5, color="tab:orange")
  axes[0].bar_label(bars, [f"{r['today']['step_ms']:.1f} -> {r['fp32']['step_ms']:.1f} ms"
                           for r in rows], fontsize=7)
  axes[0].axhline(1.0, color="k", lw=0.8)
  axes[0].set_ylim(0.9, 1.05 * max(r["step_ratio"] for r in rows) + 0.02)
  axes[0].set_title("step time with fp32 weight gradients / today's (roofline)", fontsize=9)
  axes[1].bar([i - 0.2 for i in x], [r["today"]["ici_gb_per_chip"] for r in rows], 0.4,
              label="today (bf16 sums)")
  axes[1].bar([i + 0.2 for i in x], [r["fp32"]["ici_gb_per_chip"] for r in rows], 0.4,
              label="weight_grads_fp32 (fp32 sums)")
  axes[1].set_title("ICI bytes a chip a step, GB", fontsize=9)
  axes[1].legend(fontsize=8)
  for ax in axes:
    ax.set_xticks(x, names, fontsize=7)
  fig.suptitle("fp32 weight gradients: the compiled cost (XLA:TPU roofline, not a pod run)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--cells", default=CELLS, help="comma-separated config_B_slice_layout")
  ap.add_argument("--out", default=os.path.join(RESULTS, "weight_grads_fp32.json"))
  args = ap.parse_args(argv)
  table = json.load(open(os.path.join(RESULTS, "aot_table.json")))
  out_dir = os.path.splitext(args.out)[0]
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for name in args.cells.split(","):
    cell, best = best_plan(table, name)
    row = dict(cell=name, plan=best["plan"], table_step_ms=best["step_ms"],
               today=compile_cell(name, cell, best, False, out_dir),
               fp32=compile_cell(name, cell, best, True, out_dir))
    row["step_ratio"] = row["fp32"]["step_ms"] / row["today"]["step_ms"]
    rows.append(row)
    t, f = row["today"], row["fp32"]
    print(f"{name:26s} {best['plan']:45s} today {t['step_ms']:7.1f} ms {t['gib_per_chip']:5.2f} "
          f"GiB ICI {t['ici_gb_per_chip']:5.2f} GB {t['weight_grad_sums']} | fp32 "
          f"{f['step_ms']:7.1f} ms {f['gib_per_chip']:5.2f} GiB ICI {f['ici_gb_per_chip']:5.2f} GB "
          f"{f['weight_grad_sums']} | {row['step_ratio']:.3f}x", flush=True)
  with open(args.out, "w") as fh:
    json.dump(dict(method=__doc__.split("\n\n")[1:3], cells=rows), fh, indent=1)
  plot(rows, os.path.splitext(args.out)[0] + ".png")
  print(f"wrote {args.out} and .png; compiles in {out_dir}/")
  return 0


if __name__ == "__main__":
  sys.exit(main())
