"""The pod table of docs/pods.md from the compiler: bepa-compile over configs x batch x slice x loss.

  python bench/aot_table.py --run [--budget_s 3000] [--only v5e-64] [--match xlmr_B4096]
                                                    # compile what is missing
  python bench/aot_table.py [--docs]            # the table from the JSONs (--docs: into docs/pods.md)

Each cell is one `bepa-compile` process (a libtpu crash or hang costs that cell only), run
with a time limit; its JSON goes to bench/results/aot/CELL.json. For every cell the attempts
go from the configs' own setting (data parallel, remat=dots_saveable) to remat=full, then
full with fsdp over every chip (params and Adam state sharded), then to GradCache chunks (the same negative pool, one chunk's activations): the first that fits is the
cell's figure, and every attempt is kept. Cells are compiled in priority order (base before
xlm-r, B = 4096 before 32768, v5e-64 first, padded before packed) until --budget_s is spent;
missing ones show "-". Beside each: bench/pod_estimate.py's analytic figure (50% matmul
efficiency).

Packed cells (data.packing, the configs' default) compile the packed layout with the rows that
bepa-train would choose (data.packed_rows=0: the pipeline's start-up probe) for Multi30k en-de
(../shared/data/multi30k; the bundled corpus without it) under an 8k-piece sentencepiece model
trained on it, at the cell's B and packing groups. The same probe's mean sentence length turns
every cell's pairs/s into real tokens/s (padded and packed process the same pairs).
Writes bench/results/aot_table.json and bench/results/aot_table.md.
"""
from __future__ import annotations

import argparse
import functools
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
LAYOUTS = (False, True)  # padded, packed (packed: chunk 0 only; the chunk is a loss setting)
PROBE_VOCAB = 8000
PROBE_CACHE = os.path.join("/tmp", "bepa_authors_step")  # bench/packing.py's tokenizer cache
# what to try, in order, until the step fits
# (remat, GradCache chunks, fsdp): fsdp shards params + Adam state over every chip (the batch
# stays split over all of them), which frees 3 x 4 bytes x params per chip less 1/chips
ATTEMPTS = (("dots_saveable", 0, False), ("full", 0, False), ("full", 0, True),
            ("full", 4, False), ("full", 16, False))


def cell_name(config, B, topo, chunk, packed, remat, gradcache) -> str:
  return f"{config}_B{B}_{topo}_chunk{chunk}{'_packed' if packed else ''}_{remat}_gc{gradcache}"


def cell_label(cell) -> str:
  config, B, topo, chunk, packed = cell
  return f"{config}_B{B}_{topo}_chunk{chunk}" + ("_packed" if packed else "")


# the check that a config which cannot fit is reported so: B = 65,536 unchunked on v5e-64
OVERSIZED = ("base", 65536, "v5e-64", 0, False)


def cells():
  """(config, B, slice, chunk, packed) in priority order."""
  out = []
  for packed in LAYOUTS:
    for config in CONFIGS:
      for B in BATCHES:
        for chunk in (0,) if packed else CHUNKS:
          for topo in SLICES:
            out.append((config, B, topo, chunk, packed))
        if (config, B, packed) == ("base", 4096, False):
          out.append(OVERSIZED)
  return out


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


def args_for(config, B, topo, chunk, packed, remat, gradcache, fsdp=False,
             rbg=False) -> list[str]:
  mesh = (["--config.mesh.data=1", "--config.mesh.fsdp=-1"] if fsdp else
          ["--config.mesh.data=-1", "--config.mesh.fsdp=1"])
  a = ["--config", CONFIGS[config], "--topology", topo, *COMMON, *VOCAB[config],
       f"--config.train.global_batch={B}", f"--config.loss.contrastive_chunk={chunk}",
       f"--config.model.remat={remat}", *mesh]
  if gradcache:
    a.append(f"--config.train.gradcache_chunks={gradcache}")
  if rbg:
    a.append("--config.train.dropout_rng=rbg")
  pr = probe(config, B, chips(topo), max(gradcache, 1))
  a += ["--tokens_per_sentence", f"{pr['tokens_per_sentence']:.3f}"]
  if packed:
    a += ["--config.data.packing=True", f"--config.data.packed_rows={pr['packed_rows']}"]
  else:
    a.append("--config.data.packing=False")
  return a


def load(name):
  path = os.path.join(OUT, name + ".json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


CRASHED = ("crash", "rc -11")  # XLA:TPU died of a signal (bepa-compile's JSON / a bare -11)


def attempt_name(cell, remat, gc, fsdp=False, rbg=False) -> str:
  return cell_name(*cell, remat, gc) + ("_fsdp" if fsdp else "") + ("_rbg" if rbg else "")


def walk(cell, compile_missing=None) -> tuple[list, bool]:
  """The cell's attempts in order until one fits or fails, each a dict (remat, gc, fsdp, rbg,
  rep), and whether the walk is complete. A compiler crash (libtpu's, with threefry dropout:
  see bepa_jax/aot/libtpu.py crash_line) is retried with train.dropout_rng=rbg, the same setting
  otherwise. `compile_missing(name, **setting)` makes a missing report (None: not now);
  without it the walk stops there."""
  made = []
  for remat, gc, fsdp in ATTEMPTS[:1] if cell == OVERSIZED else ATTEMPTS:
    for rbg in (False, True):
      setting = dict(remat=remat, gc=gc, fsdp=fsdp, rbg=rbg)
      name = attempt_name(cell, **setting)
      rep = load(name)
      if rep is None and compile_missing is not None:
        rep = compile_missing(name, **setting)
      if rep is None:
        return made, False
      made.append(dict(setting, rep=rep))
      if rbg or rep.get("failed") not in CRASHED:
        break
    if rep.get("failed") or rep["memory"]["fits"]:
      return made, True
  return made, True


def compile_cell(cell, deadline: float, timeout_s: float) -> None:
  def compile_missing(name, remat, gc, fsdp, rbg):
    lock = os.path.join(OUT, name + ".lock")
    if os.path.exists(lock):  # another sweep process is compiling it
      return None
    left = deadline - time.time()
    if left < 60:
      return None
    open(lock, "w").close()
    cmd = [sys.executable, "-m", "bepa_jax.cli.compile", *args_for(*cell, remat, gc, fsdp, rbg),
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
    if rep is None:  # died or timed out without a report: record it, do not retry it
      rep = dict(failed=status, tail=tail[:500])
      with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(rep, f)
    return rep

  walk(cell, compile_missing)


def best(cell):
  """(the first attempt that fits, every attempt made) for a cell."""
  made, _ = walk(cell)
  fit = [m for m in made if not m["rep"].get("failed") and m["rep"]["memory"]["fits"]]
  return (fit[0] if fit else None), made


def analytic(cell):
  """bench/pod_estimate.py's step time and MFU (50% matmul efficiency) for the same shape."""
  import pod_estimate
  from bepa_jax.config import load as config_load
  config, B, topo = cell[:3]
  if topo not in pod_estimate.SLICES:
    return None
  c = config_load.load_config(os.path.join(REPO, CONFIGS[config]),
                        [*COMMON, *VOCAB[config], f"--config.train.global_batch={B}"])
  return pod_estimate.estimate(topo, c, 0.5)


def table() -> dict:
  rows = []
  for cell in cells():
    fit, made = best(cell)
    est = analytic(cell)
    config, B, topo, chunk, packed = cell
    mean = probe(config, B, 1, 1)  # the step's sentences (independent of the grouping)
    row = dict(config=config, B=B, slice=topo, contrastive_chunk=chunk,
               layout="packed" if packed else "padded",
               tokens_per_sentence=mean["tokens_per_sentence"],
               attempts=[dict(remat=m["remat"], gradcache_chunks=m["gc"], fsdp=m["fsdp"],
                              dropout_rng_rbg=m["rbg"],
                              result=("failed: " + m["rep"]["failed"]) if m["rep"].get("failed")
                              else f"{m['rep']['memory']['total'] / 2**30:.2f} GiB "
                              f"{'fits' if m['rep']['memory']['fits'] else 'does not fit'}")
                         for m in made],
               analytic_step_ms=est["step_s_overlapped"] * 1e3 if est else None,
               analytic_mfu=est["mfu_overlapped"] if est else None)
    if fit:
      r, g, sc, rep = fit["remat"], fit["gc"], fit["rbg"], fit["rep"]
      row.update(remat=r, gradcache_chunks=g, dropout_rng_rbg=sc, mesh=rep["mesh"],
                 chips=rep["chips"],
                 gib_per_chip=rep["memory"]["total"] / 2**30,
                 state_gib=rep["memory"]["params_and_optimizer"] / 2**30,
                 temp_gib=rep["memory"]["temporaries"] / 2**30,
                 hbm_gib=rep["memory"]["hbm"] / 2**30, step_ms=rep["time"]["step_s"] * 1e3,
                 method=rep["time"]["method"].split(" ")[0], bound=rep["time"]["bound"],
                 pairs_per_s=rep["pairs_per_s"],
                 real_tokens_per_s=rep["pairs_per_s"] * 2 * mean["tokens_per_sentence"],
                 token_slots_per_step=rep.get("token_slots_per_step", 2 * B * 128),
                 mfu=rep["mfu"],
                 ici_ms=rep["time"]["ici_s"] * 1e3, compile_s=rep["compile_s"],
                 flops_total=rep["cost"]["flops_total"],
                 cls_gather_bytes=sum(c["buffer_bytes"] for c in rep["collectives"]
                                      if c["role"].startswith("[CLS] all-gather (fwd")),
                 b_by_B=len(rep["b_by_B_buffers"]))
      if packed:
        row["packing"] = probe(config, B, rep["chips"], max(g, 1))
    rows.append(row)
  first = probe("base", BATCHES[0], 1, 1)
  return dict(rows=rows, probe_data=first["data"], probe_tokenizer=first["tokenizer"])


def markdown(rows) -> str:
  head = ("| config | B | slice | layout | chunk | mesh | remat / GradCache "
          "| GiB/chip (state + temp) | step ms (bound) | pairs/s | real tokens/s | MFU "
          "| analytic ms / MFU | compile s |\n"
          "|---|---:|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
  lines = [head]
  for r in rows:
    est = (f"{r['analytic_step_ms']:.0f} / {r['analytic_mfu']:.0%}"
           if r["analytic_step_ms"] else "n/a")
    if "step_ms" not in r:
      tried = "; ".join(f"{a['remat']}/gc{a['gradcache_chunks']}"
                        f"{'/fsdp' if a['fsdp'] else ''}"
                        f"{'/rbg' if a['dropout_rng_rbg'] else ''}: {a['result']}"
                        for a in r["attempts"]) or "not compiled (time)"
      lines.append(f"| {r['config']} | {r['B']} | {r['slice']} | {r['layout']} | "
                   f"{r['contrastive_chunk']} | - | {tried} | - | - | - | - | - | {est} | - |")
      continue
    mesh = f"data={r['mesh']['data']} fsdp={r['mesh']['fsdp']}"
    gc = (f" / gc {r['gradcache_chunks']}" if r["gradcache_chunks"] else "") + (
        " / rbg dropout" if r["dropout_rng_rbg"] else "")
    layout = (f"packed {r['packing']['packed_rows']}/{r['packing']['sentences_per_group']}"
              if r["layout"] == "packed" else "padded")
    lines.append(
        f"| {r['config']} | {r['B']} | {r['slice']} | {layout} | {r['contrastive_chunk']} | "
        f"{mesh} | "
        f"{r['remat']}{gc} | {r['gib_per_chip']:.1f} ({r['state_gib']:.1f} + "
        f"{r['temp_gib']:.1f}) of {r['hbm_gib']:.0f} | {r['step_ms']:.0f} ({r['bound']}) | "
        f"{r['pairs_per_s'] / 1e3:.0f}k | {r['real_tokens_per_s'] / 1e6:.2f}M | "
        f"{r['mfu']:.0%} | {est} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


DOC = os.path.join(REPO, "docs", "pods.md")  # the page that holds the generated table
BEGIN, END = "<!-- aot_table", "<!-- /aot_table -->"


def doc_block(result: dict) -> str:
  """The table of docs/pods.md: compiled cells and those that fit nowhere, then what is missing."""
  md = [l for l in markdown(result["rows"]).splitlines() if "not compiled (time)" not in l]
  missing = [r for r in result["rows"] if not r["attempts"]]
  out = "\n".join(md)
  if missing:
    names = "; ".join(f"{r['config']} {r['B']} {r['slice']} {r['layout']} chunk "
                      f"{r['contrastive_chunk']}" for r in missing)
    out += (f"\n\nNot compiled in the sessions' time ({len(missing)} of {len(result['rows'])} "
            f"cells; 2-12 minutes a cell on this 2-core VM; `python bench/aot_table.py --run "
            f"[--match xlmr_B32768]` fills them): {names}.")
  return out


def write_doc(result: dict, path: str = DOC) -> None:
  with open(path) as f:
    text = f.read()
  a, b = text.find(BEGIN), text.find(END)
  if a < 0 or b < a:
    raise SystemExit(f"{path}: no {BEGIN} ... {END} block to rewrite")
  head = text.index("\n", a) + 1
  with open(path, "w") as f:
    f.write(text[:head] + doc_block(result) + "\n" + text[b:])


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench/aot_table.py")
  p.add_argument("--run", action="store_true", help="compile the missing cells first")
  p.add_argument("--budget_s", type=float, default=3000, help="stop starting compiles after")
  p.add_argument("--timeout_s", type=float, default=900, help="per compile")
  p.add_argument("--only", default="", help="comma-separated slices (default: all)")
  p.add_argument("--match", default="",
                 help="compile only cells whose name contains this (e.g. xlmr_B4096)")
  p.add_argument("--no_table", action="store_true", help="with --run: compile only")
  p.add_argument("--docs", action="store_true",
                 help="also rewrite the table block of docs/pods.md")
  args = p.parse_args(argv)
  os.makedirs(OUT, exist_ok=True)
  if args.run:
    deadline = time.time() + args.budget_s
    only = set(filter(None, args.only.split(",")))
    for cell in cells():
      if only and cell[2] not in only:
        continue
      if args.match not in cell_label(cell):
        continue
      if time.time() > deadline - 60:
        print("budget spent: the remaining cells stay missing", flush=True)
        break
      compile_cell(cell, deadline, args.timeout_s)
  if args.run and args.no_table:
    return
  result = table()
  md = markdown(result["rows"])
  print(md)
  done = sum("step_ms" in r for r in result["rows"])
  with open(os.path.join(REPO, "bench", "results", "aot_table.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(REPO, "bench", "results", "aot_table.md"), "w") as f:
    f.write(md + "\n")
  if args.docs:
    write_doc(result)
    print(f"rewrote the table in {DOC}")
  print(f"{done}/{len(result['rows'])} cells compiled; wrote bench/results/aot_table.json and "
        f".md; next: python bench/aot_table.py --run to fill the rest")


if __name__ == "__main__":
  main()
