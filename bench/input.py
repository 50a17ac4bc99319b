"""Can each host feed the pod? The input pipeline's pairs/s per host, for every cell of the pod
table, beside what the compiled step consumes per host.

  nice -n 10 python bench/input.py [--steps 6] [--match base_B4096] [--e2e] [--e2e_only]

For every (config, B, slice, layout) of bench/results/aot_table.json: bepa-train's pipeline as
process 0 of the slice's P hosts (each host builds its B/P rows of the global batch), run by
data.workers = 1 and 2 grain worker processes (bepa_jax/data/feeder.py, one core each). Wall
pairs/s are timed after each worker's start-up batches (2 workers / 1 worker: does anything
shared serialise them?); each worker also reports the CPU seconds of every batch: the rate of
one worker on a core of its own ("a core"), which on this shared 2-core VM the wall rate
understates by the other tenants' load. N-worker figures for N up to 8 are that 1-worker rate
x N, labelled projected (a TPU VM host has 100+ cores). The compiled step's demand per host is
the table's pairs/s over P (the faster chunk setting); headroom = projected / demand.

Data as in the pod table: L = 128, 20 masked positions, the configs' loss inputs, packing rows
chosen by bepa-train's probe, dedup on. Multi30k train en/de/fr/cs (../shared/data/multi30k,
read in place). base: an 8k-piece sentencepiece model trained on it; xlmr: a 16k-piece BPE
model through the XLM-R id layout (tokenizer.kind=xlmr_spm; XLM-R's own 250k-piece model is
not on this VM). B = 32,768 needs more meanings than Multi30k's 29,000 with dedup on: those
cells read Multi30k x COPIES written outside the repository (`enlarge`: copy k > 0 of every
line ends in " (k)" in all four languages alike, so copies are distinct sentences and meanings).

--e2e (bench/input_e2e.py): bepa-train on 2 local processes (launch/local.py), packed, made
input-heavy (Tatoeba's 112 languages, data.max_length=256, a tiny model), data.workers=0 and 1
interleaved.
Writes bench/results/input.json and input.png.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
import doc_blocks  # noqa: E402  (bench/ is not a package)
from input_e2e import CACHE, run_e2e  # noqa: E402  (tokenizers, enlarged corpus)
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")
MULTI30K = os.path.join(SHARED, "multi30k")
LANGS = ("en", "de", "fr", "cs")
COPIES = 10          # Multi30k x 10: 290k meanings for B = 32,768 with dedup on
PROJECTED = (1, 2, 4, 8)
RESULTS = os.path.join(REPO, "bench", "results")


# ---------------------------------------------------------------------------- the cells
def hosts(slice_name: str) -> int:
  """Hosts of a TPU slice (chips / chips per host)."""
  from bepa_jax import tpu_specs
  t = tpu_specs.parse(slice_name)
  return t.chips // math.prod(t.chips_per_host_bounds)


def cells(table: dict) -> list[dict]:
  """The pod table's (config, B, slice, layout) cells, in table order, with the pairs/s per
  host of the fastest plan compiled for the cell (None where none compiled) and the batch
  shards and micro-batches that set the packing groups."""
  out: dict[tuple, dict] = {}
  for r in table["rows"]:
    key = (r["config"], int(r["B"]), r["slice"], r["layout"].split()[0])  # packed R/S: packed
    cell = out.setdefault(key, dict(config=key[0], B=key[1], slice=key[2], layout=key[3],
                                    hosts=hosts(key[2]), demand=None, shards=None, micro=1))
    best = r.get("best") or {}  # the fastest plan the search compiled (bench/aot_table.py)
    if best.get("pairs_per_s") and (cell["demand"] is None
                                    or best["pairs_per_s"] / cell["hosts"] > cell["demand"]):
      cell["demand"] = best["pairs_per_s"] / cell["hosts"]
      cell["shards"] = int(best["mesh"]["data"]) * int(best["mesh"]["fsdp"])
      chunks = [o for o in best.get("overrides", []) if "train.gradcache_chunks=" in o]
      cell["micro"] = max(int(chunks[0].split("=")[1]) if chunks else 0, 1)
  for cell in out.values():
    cell["name"] = f"{cell['config']}_B{cell['B']}_{cell['slice']}_{cell['layout']}"
    cell["shards"] = cell["shards"] or hosts(cell["slice"]) * 4
  return list(out.values())


def summarize(cell: dict, core_rate: float, wall1: float, wall2: float | None) -> dict:
  """Projected N-worker rates (the 1-worker rate of a core to itself, from the workers' CPU
  seconds, x N), headroom against the demand, the workers a host needs for 2x headroom, and
  the wall rates measured here with 1 and 2 workers."""
  row = dict(cell, pairs_per_s_core=core_rate, pairs_per_s_1=wall1, pairs_per_s_2=wall2,
             scaling_2=(wall2 / wall1) if wall2 and wall1 else None,
             projected={n: core_rate * n for n in PROJECTED})
  d = cell["demand"]
  row["headroom"] = {n: core_rate * n / d for n in PROJECTED} if d else None
  row["headroom_wall_1"] = wall1 / d if d else None
  row["workers_for_2x"] = math.ceil(2 * d / core_rate) if d and core_rate else None
  return row


def last_line(rows: list[dict], n: int = max(PROJECTED)) -> str:
  """`min headroom X.XXx at CELL with N workers` over the cells with a compiled step."""
  have = [r for r in rows if r["headroom"]]
  if not have:
    return "min headroom n/a (no cell with a compiled step)"
  worst = min(have, key=lambda r: r["headroom"][n])
  return f"min headroom {worst['headroom'][n]:.2f}x at {worst['name']} with {n} workers"


def targets(rows: list[dict]) -> str:
  """The issue's targets: >= 2x with at most 8 workers everywhere; >= 1x on one core except
  v5p."""
  have = [r for r in rows if r["headroom"]]
  two = [r for r in have if r["headroom"][8] >= 2]
  single = [r for r in have if not r["slice"].startswith("v5p")]
  one = [r for r in single if r["headroom"][1] >= 1]
  return (f"targets: >= 2x with 8 workers on {len(two)} of {len(have)} cells; >= 1x on one "
          f"core on {len(one)} of {len(single)} non-v5p cells")


# ---------------------------------------------------------------------------- data
def enlarge(src: str, out: str, copies: int = COPIES, langs=LANGS) -> str:
  """Multi30k x `copies` in `out` (written once): copy k > 0 of every line ends in " (k)" in
  every language, so each copy is a new meaning with the same words."""
  done = os.path.join(out, "DONE")
  if not os.path.exists(done):
    os.makedirs(out, exist_ok=True)
    for lang in langs:
      with gzip.open(os.path.join(src, f"train.{lang}.gz"), "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
      with gzip.open(os.path.join(out, f"train.{lang}.gz"), "wt", encoding="utf-8") as f:
        for k in range(copies):
          suffix = f" ({k})" if k else ""
          f.write("".join(f"{line}{suffix}\n" for line in lines))
    open(done, "w").close()
  return out


def tokenizer(kind: str, source: str):
  """base: our 8k sentencepiece model; xlmr: a 16k BPE model read with XLM-R's id layout."""
  import io
  import sentencepiece as spm
  from bepa_jax.config import defaults as default_config
  from bepa_jax.data import factory, tokenizers
  from bepa_jax.data import tokenizer as tokenizer_lib
  d = default_config.get_config().data
  d.source, d.pairs = source, ""
  if kind == "base":
    out = os.path.join(CACHE, "spm8k")
    if not os.path.exists(os.path.join(out, "spm.model")):
      tokenizer_lib.train_sentencepiece(factory.training_texts(d), out, 8000)
    return tokenizers.load(os.path.join(out, "spm.model"), "spm")
  path = os.path.join(CACHE, "bpe16k", "sentencepiece.bpe.model")
  if not os.path.exists(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(factory.training_texts(d)),
                                   model_writer=buf, vocab_size=16000, model_type="bpe",
                                   hard_vocab_limit=False, character_coverage=0.9995,
                                   minloglevel=2)
    with open(path, "wb") as f:
      f.write(buf.getvalue())
  return tokenizers.load(path, "xlmr_spm")


def cell_specs(cell: dict, source: str):
  """The cell's typed config: the config file, the pod table's settings, this data."""
  import aot_table
  from bepa_jax.config import load as config_load
  from bepa_jax.trainer import build as build_lib
  c = config_load.load_config(os.path.join(REPO, aot_table.CONFIGS[cell["config"]]), [
      *aot_table.COMMON, *aot_table.VOCAB[cell["config"]],
      f"--config.train.global_batch={cell['B']}", f"--config.data.source={source}",
      "--config.data.pairs=", "--config.data.dedup=True",
      f"--config.data.packing={cell['layout'] != 'padded'}", "--config.data.packed_rows=0",
      f"--config.mesh.data={cell['shards']}", "--config.mesh.fsdp=1",
      f"--config.train.gradcache_chunks={cell['micro'] if cell['micro'] > 1 else 0}"])
  return build_lib.check_config(c, cell["shards"])


# ---------------------------------------------------------------------------- measuring
def measure(specs, tok, cell: dict, workers: int, steps: int, min_s: float = 4.0) -> dict:
  """pairs/s of process 0 of the cell's hosts, built by `workers` worker processes: the wall
  rate over at least `steps` batches per worker and `min_s` seconds, after each worker's
  first three (start-up, buffers filled), and the rate of a worker's CPU seconds."""
  from bepa_jax.data import feeder
  recipe = feeder.Recipe(specs, tok, cell["shards"], 0, 0, cell["hosts"])
  rows = cell["B"] // cell["hosts"]
  warm = 3 * workers
  stamps, cpu = [], []
  load = os.getloadavg()[0]
  t_open = time.perf_counter()
  with feeder.Feeder(None, 0, 10**6, workers=workers, prefetch=workers, recipe=recipe) as f:
    for i, (_, _, info) in enumerate(f):
      stamps.append(time.perf_counter())
      if i == warm - 1:
        main_cpu = time.process_time()
      if i >= warm:
        cpu.append(info["cpu_s"])
        if len(cpu) >= steps * workers and stamps[-1] - stamps[warm - 1] >= min_s:
          break
  wall = stamps[-1] - stamps[warm - 1]
  main_cpu = time.process_time() - main_cpu  # this process: receiving, copying out of shm
  return dict(consumer_ms_per_batch=1000 * main_cpu / len(cpu), workers=workers, rows=rows, batches=len(cpu), seconds=wall,
              startup_s=stamps[warm - 1] - t_open, pairs_per_s=rows * len(cpu) / wall,
              cpu_pairs_per_s_per_worker=rows / statistics.median(cpu),
              ms_per_batch_cpu=1000 * statistics.median(cpu),
              load_avg=(load, os.getloadavg()[0]))


def run_cells(args) -> list[dict]:
  table = json.load(open(os.path.join(RESULTS, "aot_table.json")))
  big = enlarge(MULTI30K, os.path.join(CACHE, f"multi30k_x{COPIES}"))
  sources = {False: f"aligned:{MULTI30K}/train.{{{','.join(LANGS)}}}",
             True: f"aligned:{big}/train.{{{','.join(LANGS)}}}"}
  toks = {k: tokenizer(k, sources[False]) for k in ("base", "xlmr")}
  rows = []
  for cell in cells(table):
    if (args.match and args.match not in cell["name"]) or not cell["demand"]:
      continue  # no demand where no step compiled (B = 65,536 does not fit)
    source = sources[cell["B"] > 29000 // 2]
    specs = cell_specs(cell, source)
    m = {w: measure(specs, toks[cell["config"]], cell, w, args.steps) for w in (1, 2)}
    core = statistics.median([m[1]["cpu_pairs_per_s_per_worker"],
                              m[2]["cpu_pairs_per_s_per_worker"]])
    row = summarize(cell, core, m[1]["pairs_per_s"], m[2]["pairs_per_s"])
    row.update(source=source.split(":", 1)[1], measured=m)
    rows.append(row)
    print(format_row(row), flush=True)
  return rows


def machine_parallelism(work: int = 20_000_000) -> float:
  """What this (shared) VM gives 2 processes now: 2 x the time of one plain busy process over
  the time of two at once (2.0 on 2 idle cores). The control for the workers' 2 / 1."""
  cmd = [sys.executable, "-c", f"x = 0\nfor i in range({work}): x += i"]
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True)
  one = time.perf_counter() - t0
  t0 = time.perf_counter()
  procs = [subprocess.Popen(cmd) for _ in range(2)]
  for p in procs:
    p.wait()
  return 2 * one / (time.perf_counter() - t0)


def run_scaling(args, cell_rows: list[dict]) -> dict:
  """1 and 2 workers again on `--scaling_cells`, interleaved `--scaling_rounds` times: the
  ratio of the 2-worker to the 1-worker wall rate in each round, on this shared VM."""
  out = {}
  toks = {}
  for row in cell_rows:
    if row["name"] not in args.scaling_cells.split(","):
      continue
    source = "aligned:" + row["source"]
    specs = cell_specs(row, source)
    tok = toks.setdefault(row["config"], tokenizer(row["config"], source))
    ratios, control = [], []
    for _ in range(args.scaling_rounds):
      control.append(machine_parallelism())
      m = {w: measure(specs, tok, row, w, args.steps) for w in (1, 2)}
      ratios.append(m[2]["pairs_per_s"] / m[1]["pairs_per_s"])
      print(f"scaling {row['name']}: 2 workers / 1 = {ratios[-1]:.2f}x; two plain busy "
            f"processes / one = {control[-1]:.2f}x (load {m[1]['load_avg'][0]:.1f})", flush=True)
    out[row["name"]] = dict(ratios=ratios, best=max(ratios), median=statistics.median(ratios),
                            control=control)
  return out


def rescore(result: dict) -> dict:
  """The stored measurements against the demand of today's bench/results/aot_table.json (the
  pod table is rebuilt as the plan search compiles more; the pipeline's rates do not change)."""
  table = json.load(open(os.path.join(RESULTS, "aot_table.json")))
  now = {c["name"]: c for c in cells(table)}
  rows = []
  for old in result["cells"]:
    cell = now[old["name"]]
    row = summarize(cell, old["pairs_per_s_core"], old["pairs_per_s_1"], old["pairs_per_s_2"])
    row.update(source=old["source"], measured=old["measured"])
    when = old.get("demand_when_measured", old["demand"])  # kept over repeated rescores
    if cell["demand"] != when:
      row["demand_when_measured"] = when
    rows.append(row)
    print(format_row(row), flush=True)
  return dict(result, cells=rows, targets=targets(rows), last_line=last_line(rows))


def merge(stored: list[dict], fresh: list[dict]) -> list[dict]:
  """Stored rows with the fresh ones in their place (or added), in the pod table's order."""
  by_name = {r["name"]: r for r in stored} | {r["name"]: r for r in fresh}
  table = json.load(open(os.path.join(RESULTS, "aot_table.json")))
  return [by_name[c["name"]] for c in cells(table) if c["name"] in by_name]


def markdown(rows: list[dict]) -> str:
  """The table of docs/data.md."""
  k = lambda v: f"{v / 1000:.1f}k" if v else "-"
  out = ["| cell (config, B, slice, layout) | hosts | rows / host | a core, pairs/s | measured "
         "here: 1 / 2 workers | demand / host | headroom, 1 core | 8 workers (projected) | "
         "workers for 2x |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    h = {int(n): v for n, v in r["headroom"].items()} if r["headroom"] else None
    out.append(f"| {r['config']} {r['B']:,} {r['slice']} {r['layout']} | {r['hosts']} | "
               f"{r['B'] // r['hosts']:,} | {k(r['pairs_per_s_core'])} | "
               f"{k(r['pairs_per_s_1'])} / {k(r['pairs_per_s_2'])} | {k(r['demand'])} | "
               + (f"{h[1]:.2f}x | {h[8]:.2f}x | {r['workers_for_2x']} |" if h else "- | - | - |"))
  return "\n".join(out)


DOC = os.path.join(REPO, "docs", "data.md")  # the page that holds the table
BEGIN, END = "<!-- input_table", "<!-- /input_table -->"


def write_doc(table: str, path: str = DOC) -> None:
  doc_blocks.rewrite(path, BEGIN, END, table)


def format_row(r: dict) -> str:
  k = lambda v: f"{v / 1000:6.1f}k" if v else "     - "
  h = lambda n: f"{r['headroom'][n]:6.2f}x" if r["headroom"] else "     - "
  scale = f"{r['scaling_2']:.2f}x" if r["scaling_2"] else "-"
  return (f"{r['name']:26s} P={r['hosts']:<3d} rows {r['B'] // r['hosts']:5d} | measured: 1 "
          f"worker {k(r['pairs_per_s_1'])}, 2 {k(r['pairs_per_s_2'])} ({scale}); a core "
          f"{k(r['pairs_per_s_core'])} | projected 4 {k(r['projected'][4])} 8 "
          f"{k(r['projected'][8])} | demand {k(r['demand'])} | headroom 1 {h(1)} 8 {h(8)}")

# ---------------------------------------------------------------------------- output
def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  have = [r for r in rows if r["demand"]]
  fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(have)), 6))
  x = range(len(have))
  bars = (("pairs_per_s_1", "1 worker, measured (wall, shared VM)"),
          ("pairs_per_s_2", "2 workers, measured (wall, shared VM)"),
          ("pairs_per_s_core", "1 worker on a core of its own (CPU time)"))
  for j, (key, label) in enumerate(bars):
    ax.bar([i - 0.35 + 0.15 * j for i in x], [r[key] for r in have], 0.15, label=label)
  eight = [{int(n): v for n, v in r["projected"].items()}[8] for r in have]  # JSON: "8"
  ax.bar([i + 0.1 for i in x], eight, 0.15, alpha=0.5,
         label="8 workers (projected: a core x 8)")
  ax.scatter([i + 0.3 for i in x], [r["demand"] for r in have], color="k", marker="_", s=200,
             zorder=3, label="compiled step's demand per host")
  ax.set_yscale("log")
  ax.set_ylabel("pairs/s per host")
  ax.set_xticks(list(x), [r["name"].replace("_", " ") for r in have], rotation=90, fontsize=7)
  ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.02), ncol=3)
  ax.set_title("input pipeline per host (process 0 of the slice) vs the compiled step", pad=48)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=6, help="timed batches per worker, per cell")
  ap.add_argument("--match", default="", help="only cells whose name contains this (the "
                  "others keep their stored figures)")
  ap.add_argument("--scaling_cells", default="base_B4096_v4-32_padded,base_B32768_v5e-64_packed")
  ap.add_argument("--scaling_rounds", type=int, default=3)
  ap.add_argument("--scaling_only", action="store_true", help="redo the scaling rounds only")
  ap.add_argument("--rescore", action="store_true",
                  help="measure nothing: the stored rates against the pod table's demand now")
  ap.add_argument("--docs", action="store_true", help="also rewrite the table in docs/data.md")
  ap.add_argument("--e2e", action="store_true", help="also the 2-process bepa-train figure")
  ap.add_argument("--e2e_only", action="store_true")
  ap.add_argument("--e2e_steps", type=int, default=40)
  ap.add_argument("--e2e_rounds", type=int, default=2)
  ap.add_argument("--out", default=os.path.join(RESULTS, "input.json"))
  args = ap.parse_args(argv)
  if not os.path.isdir(MULTI30K):
    print(f"skipped: no Multi30k at {MULTI30K}", file=sys.stderr)
    return 0
  os.makedirs(CACHE, exist_ok=True)
  again = args.e2e_only or args.scaling_only or args.rescore
  result = json.load(open(args.out)) if again and os.path.exists(args.out) else {}
  if args.rescore:
    result = rescore(result)
    plot(result["cells"], os.path.splitext(args.out)[0] + ".png")
  elif args.scaling_only:
    result["scaling"] = run_scaling(args, result["cells"])
  elif not args.e2e_only:
    rows = run_cells(args)
    if args.match and os.path.exists(args.out):  # some cells again: the rest keep their figures
      stored = json.load(open(args.out))
      result = rescore(dict(stored, cells=merge(stored["cells"], rows)))
      rows = result["cells"]
    else:
      result = dict(method=__doc__.split("\n\n")[1:4], cores=os.cpu_count(),
                    load_avg=os.getloadavg(), copies=COPIES, cells=rows,
                    scaling=run_scaling(args, rows), targets=targets(rows),
                    last_line=last_line(rows))
    plot(rows, os.path.splitext(args.out)[0] + ".png")
  if args.e2e or args.e2e_only:
    result["e2e"] = run_e2e(args)
    print(f"e2e: 2 processes, packed, Tatoeba 112 languages, L=256: data.workers=1 gives "
          f"{result['e2e']['speedup']:.2f}x the steps/s of data.workers=0 (best of "
          f"{args.e2e_rounds} each, interleaved)")
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  if args.docs and "cells" in result:
    write_doc(markdown(result["cells"]))
  if "targets" in result:
    print(markdown(result["cells"]))
    print(result["targets"])
    print(result["last_line"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
