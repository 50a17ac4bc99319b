"""The README's pod table from the compiler: bepa-compile over configs x batch x slice x loss.

  python bench/aot_table.py --run [--budget_s 3000] [--only v5e-64] [--match xlmr_B4096]
                                                    # compile what is missing
  python bench/aot_table.py                                           # the table from the JSONs

Each cell is one `bepa-compile` process (a libtpu crash or hang costs that cell only), run
with a time limit; its JSON goes to bench/results/aot/CELL.json. For every cell the attempts
go from the configs' own setting (data parallel, remat=dots_saveable) to remat=full, then to
GradCache chunks (the same negative pool, one chunk's activations): the first that fits is the
cell's figure, and every attempt is kept. Cells are compiled in priority order (base before
xlm-r, B = 4096 before 32768, v5e-64 first) until --budget_s is spent; missing ones show "-".
Beside each: bench/pod_estimate.py's analytic figure (50% matmul efficiency).
Writes bench/results/aot_table.json and bench/results/aot_table.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
OUT = os.path.join(REPO, "bench", "results", "aot")
HLO_DIR = os.environ.get("BEPA_AOT_HLO_DIR", "")  # large: kept out of bench/results
CONFIGS = {"base": "configs/base.py", "xlmr": "configs/bepa_xlmr_base.py"}
COMMON = ["--config.data.max_length=128", "--config.data.max_predictions_per_seq=20",
          "--config.model.dtype=bfloat16"]
VOCAB = {"base": ["--config.model.vocab_size=32000"], "xlmr": []}
SLICES = ("v5e-64", "v4-32", "v5p-128", "v5e-256")
BATCHES = (4096, 32768)
CHUNKS = (0, 1024)
# what to try, in order, until the step fits
ATTEMPTS = (("dots_saveable", 0), ("full", 0), ("full", 4), ("full", 16))


def cell_name(config, B, topo, chunk, remat, gradcache) -> str:
  return f"{config}_B{B}_{topo}_chunk{chunk}_{remat}_gc{gradcache}"


# the check that a config which cannot fit is reported so: B = 65,536 unchunked on v5e-64
OVERSIZED = ("base", 65536, "v5e-64", 0)


def cells():
  """(config, B, slice, chunk) in priority order."""
  out = []
  for config in CONFIGS:
    for B in BATCHES:
      for chunk in CHUNKS:
        for topo in SLICES:
          out.append((config, B, topo, chunk))
      if (config, B) == ("base", 4096):
        out.append(OVERSIZED)
  return out


def args_for(config, B, topo, chunk, remat, gradcache) -> list[str]:
  a = ["--config", CONFIGS[config], "--topology", topo, *COMMON, *VOCAB[config],
       f"--config.train.global_batch={B}", f"--config.loss.contrastive_chunk={chunk}",
       f"--config.model.remat={remat}", "--config.mesh.data=-1", "--config.mesh.fsdp=1"]
  if gradcache:
    a.append(f"--config.train.gradcache_chunks={gradcache}")
  return a


def load(name):
  path = os.path.join(OUT, name + ".json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def compile_cell(cell, deadline: float, timeout_s: float) -> None:
  config, B, topo, chunk = cell
  attempts = ATTEMPTS[:1] if cell == OVERSIZED else ATTEMPTS  # its point: that it does not fit
  for remat, gc in attempts:
    name = cell_name(config, B, topo, chunk, remat, gc)
    rep = load(name)
    lock = os.path.join(OUT, name + ".lock")
    if rep is None and os.path.exists(lock):  # another sweep process is compiling it
      return
    if rep is None:
      open(lock, "w").close()
      left = deadline - time.time()
      if left < 60:
        os.remove(lock)
        return
      cmd = [sys.executable, "-m", "bepa_jax.aot", *args_for(config, B, topo, chunk, remat, gc),
             "--out", os.path.join(OUT, name + ".json")]
      if HLO_DIR:  # the optimised HLO, to re-read a cell without compiling it again
        os.makedirs(HLO_DIR, exist_ok=True)
        cmd += ["--hlo", os.path.join(HLO_DIR, name + ".hlo")]
      t0 = time.time()
      print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
      try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              timeout=min(timeout_s, left))
        status = f"rc {proc.returncode}"
        tail = (proc.stderr.strip().splitlines() or [""])[-1]
      except subprocess.TimeoutExpired:
        status, tail = "timeout", ""
      print(f"  {status} in {time.time() - t0:.0f} s {tail[:200]}", flush=True)
      os.remove(lock)
      rep = load(name)
      if rep is None:  # crashed or timed out: record it, do not retry the same setting
        with open(os.path.join(OUT, name + ".json"), "w") as f:
          json.dump(dict(failed=status, tail=tail[:500]), f)
        return
    if rep.get("failed"):
      return
    if rep["memory"]["fits"]:
      return


def best(cell):
  """(the first attempt that fits, every attempt made) for a cell."""
  made = []
  for remat, gc in ATTEMPTS:
    rep = load(cell_name(*cell, remat, gc))
    if rep is None:
      break
    made.append((remat, gc, rep))
    if rep.get("failed") or rep["memory"]["fits"]:
      break
  fit = [m for m in made if not m[2].get("failed") and m[2]["memory"]["fits"]]
  return (fit[0] if fit else None), made


def analytic(cell):
  """bench/pod_estimate.py's step time and MFU (50% matmul efficiency) for the same shape."""
  import pod_estimate
  from bepa_jax import train
  config, B, topo, _ = cell
  if topo not in pod_estimate.SLICES:
    return None
  c = train.load_config(os.path.join(REPO, CONFIGS[config]),
                        [*COMMON, *VOCAB[config], f"--config.train.global_batch={B}"])
  return pod_estimate.estimate(topo, c, 0.5)


def table() -> dict:
  rows = []
  for cell in cells():
    fit, made = best(cell)
    est = analytic(cell)
    row = dict(config=cell[0], B=cell[1], slice=cell[2], contrastive_chunk=cell[3],
               attempts=[dict(remat=r, gradcache_chunks=g,
                              result=("failed: " + rep["failed"]) if rep.get("failed") else
                              f"{rep['memory']['total'] / 2**30:.2f} GiB "
                              f"{'fits' if rep['memory']['fits'] else 'does not fit'}")
                         for r, g, rep in made],
               analytic_step_ms=est["step_s_overlapped"] * 1e3 if est else None,
               analytic_mfu=est["mfu_overlapped"] if est else None)
    if fit:
      r, g, rep = fit
      row.update(remat=r, gradcache_chunks=g, mesh=rep["mesh"], chips=rep["chips"],
                 gib_per_chip=rep["memory"]["total"] / 2**30,
                 state_gib=rep["memory"]["params_and_optimizer"] / 2**30,
                 temp_gib=rep["memory"]["temporaries"] / 2**30,
                 hbm_gib=rep["memory"]["hbm"] / 2**30, step_ms=rep["time"]["step_s"] * 1e3,
                 method=rep["time"]["method"].split(" ")[0], bound=rep["time"]["bound"],
                 tokens_per_s=rep["tokens_per_s"], mfu=rep["mfu"],
                 ici_ms=rep["time"]["ici_s"] * 1e3, compile_s=rep["compile_s"],
                 flops_total=rep["cost"]["flops_total"],
                 cls_gather_bytes=sum(c["buffer_bytes"] for c in rep["collectives"]
                                      if c["role"].startswith("[CLS] all-gather (fwd")),
                 b_by_B=len(rep["b_by_B_buffers"]))
    rows.append(row)
  return dict(rows=rows)


def markdown(rows) -> str:
  head = ("| config | B | slice | chunk | mesh | remat / GradCache | GiB/chip (state + temp) "
          "| step ms (bound) | tokens/s | MFU | analytic ms / MFU | compile s |\n"
          "|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
  lines = [head]
  for r in rows:
    est = (f"{r['analytic_step_ms']:.0f} / {r['analytic_mfu']:.0%}"
           if r["analytic_step_ms"] else "n/a")
    if "step_ms" not in r:
      tried = "; ".join(f"{a['remat']}/gc{a['gradcache_chunks']}: {a['result']}"
                        for a in r["attempts"]) or "not compiled (time)"
      lines.append(f"| {r['config']} | {r['B']} | {r['slice']} | {r['contrastive_chunk']} | - | "
                   f"{tried} | - | - | - | - | {est} | - |")
      continue
    mesh = f"data={r['mesh']['data']} fsdp={r['mesh']['fsdp']}"
    gc = f" / gc {r['gradcache_chunks']}" if r["gradcache_chunks"] else ""
    lines.append(
        f"| {r['config']} | {r['B']} | {r['slice']} | {r['contrastive_chunk']} | {mesh} | "
        f"{r['remat']}{gc} | {r['gib_per_chip']:.1f} ({r['state_gib']:.1f} + "
        f"{r['temp_gib']:.1f}) of {r['hbm_gib']:.0f} | {r['step_ms']:.0f} ({r['bound']}) | "
        f"{r['tokens_per_s'] / 1e6:.2f}M | {r['mfu']:.0%} | {est} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench/aot_table.py")
  p.add_argument("--run", action="store_true", help="compile the missing cells first")
  p.add_argument("--budget_s", type=float, default=3000, help="stop starting compiles after")
  p.add_argument("--timeout_s", type=float, default=900, help="per compile")
  p.add_argument("--only", default="", help="comma-separated slices (default: all)")
  p.add_argument("--match", default="",
                 help="compile only cells whose name contains this (e.g. xlmr_B4096)")
  args = p.parse_args(argv)
  os.makedirs(OUT, exist_ok=True)
  if args.run:
    deadline = time.time() + args.budget_s
    only = set(filter(None, args.only.split(",")))
    for cell in cells():
      if only and cell[2] not in only:
        continue
      if args.match not in "{}_B{}_{}_chunk{}".format(*cell):
        continue
      if time.time() > deadline - 60:
        print("budget spent: the remaining cells stay missing", flush=True)
        break
      compile_cell(cell, deadline, args.timeout_s)
  result = table()
  md = markdown(result["rows"])
  print(md)
  done = sum("step_ms" in r for r in result["rows"])
  with open(os.path.join(REPO, "bench", "results", "aot_table.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(REPO, "bench", "results", "aot_table.md"), "w") as f:
    f.write(md + "\n")
  print(f"{done}/{len(result['rows'])} cells compiled; wrote bench/results/aot_table.json and "
        f".md; next: python bench/aot_table.py --run to fill the rest")


if __name__ == "__main__":
  main()
