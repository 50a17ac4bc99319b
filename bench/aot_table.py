"""The pod table of docs/pods.md from the compiler: `bepa-compile --search` over configs x batch x
slice x layout, the fastest plan that fits per cell.

  python bench/aot_table.py --run [--budget_s 4500] [--match xlmr_B4096] [--only v5e-64]
                            [--max_per_cell N]   # search the cells, compiling what is missing
  python bench/aot_table.py [--docs]           # the table from the JSONs (--docs: into docs/pods.md)

Every cell runs bepa_jax/aot/search.py's search (the grid and its pruning are bepa-compile
--search's), each plan one `bepa-compile` process (a libtpu crash or hang costs that plan only)
at `nice`, with a time limit; its JSON goes to bench/results/aot/CELL__PLAN.json and is never
compiled again. The reports of the earlier table (CELL_chunkC[_packed]_REMAT_gcK[_fsdp][_rbg]
.json: the first of dots_saveable, full, full + fsdp, GradCache that fits, data parallel,
scanned) are plans of the same grid and count as compiled: "today's plan" of a cell is that
ladder's first fit, and the search's best is never slower. Without --run (or once --budget_s is
spent) a plan not on disk is "not compiled" and the cell is marked partly searched. Cells are
searched in the order of the issue's targets (B = 4096 on v5e-64 and v5e-256), then the rest.

Packed cells (data.packing, the configs' default) compile the packed layout with the rows that
bepa-train would choose (data.packed_rows=0: the pipeline's start-up probe) for Multi30k en-de
(../shared/data/multi30k; the bundled corpus without it) under an 8k-piece sentencepiece model
trained on it, at the cell's B and packing groups. The same probe's mean sentence length turns
every cell's pairs/s into real tokens/s and gives the model FLOPs of the MFU column (padded
and packed process the same pairs). Writes bench/results/aot_table.json and .md (the table,
its targets and the docs block: bench/aot_table_doc.py).
"""
from __future__ import annotations

import argparse
import functools
import glob
import itertools
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, REPO)
import aot_table_doc as doc  # noqa: E402  (bench/ is not a package)

OUT = os.path.join(REPO, "bench", "results", "aot")
HLO_DIR = os.environ.get("BEPA_AOT_HLO_DIR", "")  # large: kept out of bench/results
CONFIGS = {"base": "configs/base.py", "xlmr": "configs/bepa_xlmr_base.py"}
COMMON = ["--config.data.max_length=128", "--config.data.max_predictions_per_seq=20",
          "--config.model.dtype=bfloat16"]
VOCAB = {"base": ["--config.model.vocab_size=32000"], "xlmr": []}
SLICES = ("v5e-64", "v4-32", "v5p-128", "v5e-256")
BATCHES = (4096, 32768)
LAYOUTS = (False, True)  # padded, packed
PROBE_VOCAB = 8000
PROBE_CACHE = os.path.join("/tmp", "bepa_authors_step")  # bench/packing.py's tokenizer cache
# the targets first: B = 4096 on v5e-64 and v5e-256, both configs, padded and packed
PRIORITY = [("xlmr", 4096, "v5e-64", False), ("base", 4096, "v5e-256", False),
            ("base", 4096, "v5e-64", False), ("xlmr", 4096, "v5e-256", False),
            ("base", 4096, "v5e-256", True), ("xlmr", 4096, "v5e-256", True),
            ("base", 4096, "v5e-64", True), ("xlmr", 4096, "v5e-64", True)]
# the check that a config which cannot fit is reported so: B = 65,536 unchunked on v5e-64
OVERSIZED = ("base", 65536, "v5e-64", False)
# the earlier table's ladder (remat, GradCache chunks, fsdp): its first fit is today's plan
LADDER = (("dots_saveable", 0, False), ("full", 0, False), ("full", 0, True),
          ("full", 4, False), ("full", 16, False))


def cells():
  """(config, B, slice, packed) in table order: padded first, base before xlm-r."""
  out = []
  for packed, config, B in itertools.product(LAYOUTS, CONFIGS, BATCHES):
    out += [(config, B, topo, packed) for topo in SLICES]
    if (config, B, packed) == ("base", 4096, False):
      out.append(OVERSIZED)
  return out


def search_order():
  rest = [c for c in cells() if c not in PRIORITY and c != OVERSIZED]
  return PRIORITY + rest


def cell_label(cell) -> str:
  config, B, topo, packed = cell
  return f"{config}_B{B}_{topo}" + ("_packed" if packed else "")


def plan_path(cell, plan) -> str:
  return os.path.join(OUT, f"{cell_label(cell)}__{plan.key}.json")


def old_name(cell, chunk, remat, gc, fsdp, rbg) -> str:
  """The earlier table's file name of one ladder step (data parallel, scanned layers)."""
  config, B, topo, packed = cell
  return (f"{config}_B{B}_{topo}_chunk{chunk}{'_packed' if packed else ''}_{remat}_gc{gc}"
          + ("_fsdp" if fsdp else "") + ("_rbg" if rbg else ""))


def chips(topo: str) -> int:
  from bepa_jax import tpu_specs
  return tpu_specs.parse(topo).chips


@functools.cache
def probe(config: str, B: int, shards: int, micro: int) -> dict:
  """What bepa-train's packing probe (data.packed_rows=0) chooses for Multi30k en-de at this
  global batch and grouping: rows per group, and the mean real tokens per sentence."""
  import authors_step
  from bepa_jax.config import load as config_load
  from bepa_jax.data import factory
  from bepa_jax.data import tokenizer as tokenizer_lib
  source, data_name = authors_step.data_source(authors_step.MULTI30K)
  tok = tokenizer_lib.SentencePieceTokenizer(
      authors_step.tokenizer_path(source, PROBE_VOCAB, PROBE_CACHE))
  c = config_load.load_config(os.path.join(REPO, CONFIGS[config]), [
      *COMMON, *VOCAB[config], f"--config.train.global_batch={B}", f"--config.data.source={source}",
      "--config.data.pairs=", "--config.data.languages=en,de",
      "--config.data.dedup=False",  # B = 32,768 draws more pairs than Multi30k has
      "--config.data.packing=True", "--config.data.packed_rows=0",
      f"--config.train.gradcache_chunks={micro if micro > 1 else 0}"])
  pipe = factory.build_pipeline(c, tok, batch_shards=shards)
  p = pipe.packing_probe
  return dict(data=data_name, tokenizer=f"sentencepiece {PROBE_VOCAB} pieces on it",
              packed_rows=int(pipe.rows[0]), sentences_per_group=p["sentences_per_group"],
              rows_needed_mean=p["rows_needed_mean"],
              tokens_per_sentence=p["mean_tokens_per_sentence"], steps=p["steps"])


def cell_config(cell):
  """The cell's config (the plan's settings come on top)."""
  from bepa_jax.config import load as config_load
  config, B, topo, packed = cell
  return config_load.load_config(os.path.join(REPO, CONFIGS[config]), [
      *COMMON, *VOCAB[config], f"--config.train.global_batch={B}",
      f"--config.data.packing={packed}"])


def args_for(cell, plan) -> list[str]:
  """bepa-compile's arguments for one plan of one cell."""
  config, B, topo, packed = cell
  a = ["--config", CONFIGS[config], "--topology", topo, *COMMON, *VOCAB[config],
       f"--config.train.global_batch={B}", *plan.overrides()]
  pr = probe(config, B, chips(topo) // plan.tensor, max(plan.gradcache_chunks, 1))
  a += ["--tokens_per_sentence", f"{pr['tokens_per_sentence']:.3f}"]
  if packed:
    a += ["--config.data.packing=True", f"--config.data.packed_rows={pr['packed_rows']}"]
  else:
    a.append("--config.data.packing=False")
  return a


def load(path):
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def compiled_before(cell) -> dict:
  """plan -> report of every plan of the cell on disk: this table's and the earlier one's."""
  from bepa_jax.aot.search import RBG, THREEFRY, Plan
  found = {}
  for chunk, (remat, gc, fsdp), rbg in itertools.product((0, 1024), LADDER, (False, True)):
    rep = load(os.path.join(OUT, old_name(cell, chunk, remat, gc, fsdp, rbg) + ".json"))
    if rep is not None:
      found[Plan(remat, "fsdp" if fsdp else "data", 0, chunk, True, RBG if rbg else THREEFRY,
                 gc)] = rep
  for path in glob.glob(os.path.join(OUT, f"{cell_label(cell)}__*.json")):
    found[Plan.from_key(os.path.basename(path)[len(cell_label(cell)) + 2:-5])] = load(path)
  return found


def todays_plan(cell):
  """The earlier table's choice: its ladder's first plan that fits (a crash retried with rbg)."""
  from bepa_jax.aot.search import RBG, THREEFRY, Plan
  for remat, gc, fsdp in LADDER[:1] if cell == OVERSIZED else LADDER:
    for rng in (THREEFRY, RBG):
      plan = Plan(remat, "fsdp" if fsdp else "data", 0, 0, True, rng, gc)
      rep = load(plan_path(cell, plan)) or load(os.path.join(
          OUT, old_name(cell, 0, remat, gc, fsdp, rng == RBG) + ".json"))
      if rep is None or rep.get("failed") not in ("crash", "rc -11"):
        break
    if rep is None:
      return None, None
    if not rep.get("failed") and rep["memory"]["fits"]:
      return plan, rep
  return None, rep


def compiler(cell, deadline: float, timeout_s: float, max_compiles: int, nice: int):
  """compile_fn of a cell's search: a `bepa-compile` process per plan, while time is left."""
  count = [0]

  def compile_fn(plan):
    left = deadline - time.time()
    if left < 60 or (max_compiles and count[0] >= max_compiles):
      return None
    count[0] += 1
    path = plan_path(cell, plan)
    cmd = ["nice", "-n", str(nice), sys.executable, "-m", "bepa_jax.cli.compile",
           *args_for(cell, plan), "--out", path]
    if HLO_DIR:  # the optimised HLO, to re-read a plan without compiling it again
      os.makedirs(HLO_DIR, exist_ok=True)
      cmd += ["--hlo", os.path.join(HLO_DIR, os.path.basename(path)[:-5] + ".hlo")]
    t0 = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {cell_label(cell)} {plan.describe()} ...", flush=True)
    try:
      # compiled in this child itself (a crash: its signal, "rc -11"), so a timeout stops it
      proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                            timeout=min(timeout_s, left),
                            env=dict(os.environ, BEPA_COMPILE_IN_PROCESS="1"))
      status, tail = f"rc {proc.returncode}", (proc.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
      status, tail = "timeout", ""
      if left < timeout_s:  # the budget's end, not the plan's: it stays to compile
        print(f"  stopped at the budget's end after {time.time() - t0:.0f} s", flush=True)
        return None
    print(f"  {status} in {time.time() - t0:.0f} s {tail[:200]}", flush=True)
    rep = load(path)
    if rep is None:  # died or timed out without a report: record it, do not retry it
      rep = dict(failed=status, tail=tail[:500])
      with open(path, "w") as f:
        json.dump(rep, f)
    return rep
  return compile_fn


def search_cell(cell, compile_fn=None):
  """The cell's search over what is on disk (and what `compile_fn` compiles)."""
  from bepa_jax import tpu_specs
  from bepa_jax.aot import search as search_lib
  config = cell_config(cell)
  topo = tpu_specs.parse(cell[2])
  shape = search_lib.Shape.of(config, topo.chips, topo.chip.hbm_bytes,
                              int(config.model.vocab_size))
  s = search_lib.Search(config, shape, compile_fn or (lambda plan: None), log=lambda m: None)
  for plan, rep in compiled_before(cell).items():
    s.seed(plan, rep)
  if cell != OVERSIZED:  # the does-not-fit check keeps its one plan
    s.run()
  return s


def short(plan) -> str:
  """A plan in a table cell."""
  parts = [{"dots_saveable": "dots"}.get(plan.remat, plan.remat),
           {"zero1": "ZeRO-1"}.get(plan.sharding, plan.sharding)]
  if plan.mlm_vocab_chunk:
    parts.append(f"MLM chunk {plan.mlm_vocab_chunk}")
  if plan.contrastive_chunk:
    parts.append(f"con. chunk {plan.contrastive_chunk}")
  if not plan.scan_layers:
    parts.append("unrolled")
  if plan.dropout_rng == "rbg":
    parts.append("rbg")
  if plan.gradcache_chunks:
    parts.append(f"gc {plan.gradcache_chunks}")
  if plan.tensor > 1:
    parts.append(f"tensor {plan.tensor}")
  return " / ".join(parts)


def hfu(rep) -> float:
  """XLA's flops / peak / step: `hfu` in bepa-compile's reports, `mfu` in the earlier ones."""
  return rep["hfu"] if "hfu" in rep else rep["mfu"]


def model_mfu(cell, rep, tokens_per_sentence) -> float:
  """Model FLOPs of the real tokens / (chips x peak x step): bepa_jax/aot/flops.py."""
  from bepa_jax.aot import flops
  from bepa_jax.model import EncoderConfig
  config = cell_config(cell)
  fl = flops.step_model_flops(config, EncoderConfig.from_config(config.model), tokens_per_sentence)
  return fl["total"] / (rep["chips"] * rep["peak_bf16_flops"] * rep["time"]["step_s"])


def figures(cell, plan, rep, tokens_per_sentence) -> dict:
  m, t = rep["memory"], rep["time"]
  return dict(plan=short(plan), plan_key=plan.key, overrides=plan.overrides(),
              mesh=rep["mesh"], chips=rep["chips"], gib_per_chip=m["total"] / 2 ** 30,
              state_gib=m["params_and_optimizer"] / 2 ** 30, temp_gib=m["temporaries"] / 2 ** 30,
              hbm_gib=m["hbm"] / 2 ** 30, step_ms=t["step_s"] * 1e3, bound=t["bound"],
              method=t["method"].split(" ")[0], pairs_per_s=rep["pairs_per_s"],
              real_tokens_per_s=rep["pairs_per_s"] * 2 * tokens_per_sentence,
              mfu=model_mfu(cell, rep, tokens_per_sentence), hfu=hfu(rep),
              bytes_accessed_gb=rep["cost"]["bytes_accessed_per_chip"] / 1e9,
              ici_ms=t["ici_s"] * 1e3, compile_s=rep["compile_s"],
              token_slots_per_step=rep.get("token_slots_per_step"))


def row(cell, s) -> dict:
  """A cell's table row: the search's fastest plan, today's plan, what was tried."""
  config, B, topo, packed = cell
  tps = probe(config, B, 1, 1)["tokens_per_sentence"]  # the step's sentences: any grouping
  result = s.result()
  missing = sum(r["status"] == "not compiled (budget)" for r in result["plans"])
  new = sum(os.path.exists(plan_path(cell, t["plan"])) for t in s.tried.values())
  state = ("not searched (the does-not-fit check)" if cell == OVERSIZED else "complete"
           if not missing else f"partial: {new} new plan(s), {missing} not compiled" if new
           else f"today's plan only: {missing} plan(s) not compiled")
  r = dict(config=config, B=B, slice=topo, layout="packed" if packed else "padded",
           tokens_per_sentence=tps, search=state,
           tried=[dict(plan=short(search_plan(p)), status=p["status"],
                       **{k: p[k] for k in ("step_ms", "gib_per_chip") if k in p})
                  for p in result["plans"]])
  today, today_rep = todays_plan(cell)
  if today is not None:
    r["today"] = figures(cell, today, today_rep, tps)
  if result["best"]:
    plan = s.tried[result["best"]]["plan"]
    rep = s.tried[result["best"]]["rep"]
    r["best"] = figures(cell, plan, rep, tps)
    if packed:
      r["packing"] = probe(config, B, rep["chips"], max(plan.gradcache_chunks, 1))
  return r


def search_plan(p):
  from bepa_jax.aot.search import Plan
  return Plan(**p["plan"])


def table(compile_for=None) -> dict:
  """Every cell's search (compiling through `compile_for(cell)` where given) and its row."""
  rows = []
  for cell in cells():
    rows.append(row(cell, search_cell(cell, compile_for(cell) if compile_for else None)))
  first = probe("base", BATCHES[0], 1, 1)
  return dict(rows=rows, targets=doc.targets(rows), probe_data=first["data"],
              probe_tokenizer=first["tokenizer"])


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench/aot_table.py")
  p.add_argument("--run", action="store_true", help="search the cells, compiling what is missing")
  p.add_argument("--budget_s", type=float, default=4500, help="stop starting compiles after")
  p.add_argument("--timeout_s", type=float, default=1200, help="per compile")
  p.add_argument("--max_per_cell", type=int, default=0, help="compiles per cell (0: no limit)")
  p.add_argument("--nice", type=int, default=10, help="the compiles' niceness")
  p.add_argument("--only", default="", help="comma-separated slices (default: all)")
  p.add_argument("--match", default="",
                 help="search only cells whose name matches this regex (e.g. xlmr_B4096, "
                 "base_B4096_v5e-64$: padded only)")
  p.add_argument("--no_table", action="store_true", help="with --run: compile only")
  p.add_argument("--docs", action="store_true",
                 help="also rewrite the table block of docs/pods.md")
  args = p.parse_args(argv)
  os.makedirs(OUT, exist_ok=True)
  if args.run:
    deadline = time.time() + args.budget_s
    only = set(filter(None, args.only.split(",")))
    for cell in search_order():
      if (only and cell[2] not in only) or not re.search(args.match, cell_label(cell)):
        continue
      if time.time() > deadline - 60:
        print("budget spent: the remaining cells keep what is on disk", flush=True)
        break
      search_cell(cell, compiler(cell, deadline, args.timeout_s, args.max_per_cell, args.nice))
  if args.run and args.no_table:
    return
  result = table()
  md = doc.markdown(result["rows"])
  print(md + "\n\n" + doc.targets_markdown(result["targets"]))
  with open(os.path.join(REPO, "bench", "results", "aot_table.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(REPO, "bench", "results", "aot_table.md"), "w") as f:
    f.write(md + "\n")
  if args.docs:
    doc.write_doc(result)
    print(f"rewrote the table in {doc.DOC}")
  done = sum(r["search"] == "complete" for r in result["rows"])
  print(f"{done}/{len(result['rows'])} cells fully searched; wrote bench/results/aot_table.json "
        f"and .md; next: python bench/aot_table.py --run to search the rest")


if __name__ == "__main__":
  main()
