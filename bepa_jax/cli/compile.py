"""`bepa-compile`: the real train step, compiled by XLA:TPU for a TPU slice, on this machine.

  bepa-compile --config configs/base.py --topology v5e-64 [--slices 2] [--out report.json] \
    [--config.train.global_batch=8192 ...]
  bepa-compile --search ... [--out search.json] [--max_compiles N]   # the fastest plan that fits

No TPU is needed and nothing is allocated or downloaded (bepa_jax/aot/compile.py). The
compiled step reports memory per chip (fits or not), FLOPs, collectives and a step-time
estimate (bepa_jax/aot/report.py). The compile runs in a child process, `python -m
bepa_jax.cli.compile` (bepa_jax/aot/libtpu.py run_isolated): a libtpu crash is one line.
`--search` compiles a pruned grid of plans (bepa_jax/aot/search.py), each in its own child,
and ranks those that fit by step time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import jax

from bepa_jax import tpu_specs
from bepa_jax.aot import batch as batch_lib
from bepa_jax.aot import compile as compile_lib
from bepa_jax.aot import libtpu
from bepa_jax.aot import search as search_lib
from bepa_jax.aot.report import advice, format_report, gib
from bepa_jax.cli import common as cli
from bepa_jax.config import load as config_load
from bepa_jax.errors import ConfigError

PROG = "bepa-compile"


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog=PROG, allow_abbrev=False,
      description="Compile the configured train step for a TPU slice with XLA:TPU (no TPU "
      "needed) and report memory per chip, FLOPs, collectives and a step-time estimate. "
      "Takes bepa-train's --config FILE and --config.KEY=VALUE overrides.")
  p.add_argument("--config", default=config_load.DEFAULT_CONFIG_FILE)
  p.add_argument("--topology", required=True,
                 help=f"TPU slice: {', '.join(tpu_specs.known_names())}")
  p.add_argument("--slices", type=int, default=1,
                 help="multislice: this many slices over DCN (needs mesh.dcn_data = slices)")
  p.add_argument("--out", default="", help="JSON report path (default: none)")
  p.add_argument("--hlo", default="", help="also write the optimised HLO text here")
  p.add_argument("--tokens_per_sentence", type=float, default=0.0,
                 help="mean real tokens per sentence with [CLS]/[SEP] (bepa-train's `packing:` "
                 "line reports it): gives real tokens/s; default: pairs/s and positions/s only")
  p.add_argument("--search", action="store_true",
                 help="compile a grid of plans (remat, ZeRO-1 / fsdp / tensor axis, MLM and "
                 "contrastive chunks, scanned or unrolled layers, dropout PRNG), each in its "
                 "own process, "
                 "and rank those that fit by step time; --out: the ranking as JSON, each "
                 "plan's report in OUT's stem + .plans/")
  p.add_argument("--max_compiles", type=int, default=0,
                 help="with --search: compile at most this many plans (0: no limit)")
  args, rest = p.parse_known_args(argv)
  for i, item in enumerate(rest):
    prev = rest[i - 1] if i else ""
    if not item.startswith("--config.") and not (prev.startswith("--config.") and "=" not in prev):
      raise ConfigError(f"unexpected argument {item!r} (overrides are --config.KEY=VALUE)")
  if args.hlo and args.search:
    raise ConfigError("--hlo writes one compiled plan: drop --search, or pass --hlo with the "
                      "chosen plan's overrides")
  if args.max_compiles < 0:
    raise ConfigError(f"--max_compiles must be >= 0, got {args.max_compiles}")
  if args.slices < 1:
    raise ConfigError(f"--slices must be >= 1, got {args.slices}")
  if not (math.isfinite(args.tokens_per_sentence) and args.tokens_per_sentence >= 0):
    raise ConfigError(f"--tokens_per_sentence must be >= 0, got {args.tokens_per_sentence}")
  return args, rest


def run_cli(argv) -> int:
  args, overrides = parse_args(argv)
  topo = tpu_specs.parse(args.topology)
  # before the config is loaded: the missing install is the first thing to fix
  libtpu.require_libtpu()
  config = config_load.load_config(args.config, overrides)
  if args.search:
    return run_search(args, overrides, config, topo)
  rep = compile_lib.compile_step(config, topo, args.slices, args.hlo, args.tokens_per_sentence)
  rep["config"] = args.config
  rep["overrides"] = list(overrides)
  if args.out:  # first: the report survives a closed stdout
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(rep, f, indent=2, default=str)
  print(format_report(rep))
  if args.out:
    print(f"\nwrote {args.out}")
  if not rep["memory"]["fits"]:
    m = rep["memory"]
    temps = "" if m["temporaries"] is None else f", temporaries {gib(m['temporaries'])}"
    print(f"{PROG}: error: does not fit: {gib(m['total'])} GiB per chip needed, "
          f"{topo.chip.kind} has {gib(m['hbm'])} GiB (params + optimizer "
          f"{gib(m['params_and_optimizer'])}{temps}): try {advice(rep, config)}",
          file=sys.stderr)
    return cli.EXIT_FAILED
  return cli.EXIT_OK


def plan_compiler(args, overrides, config, plans_dir: str):
  """compile_fn for search.Search: one child process per plan, its report read back."""
  rows = batch_lib.packed_rows(config)
  count = [0]

  def compile_fn(plan):
    if args.max_compiles and count[0] >= args.max_compiles:
      return None
    count[0] += 1
    path = os.path.join(plans_dir, plan.key + ".json")
    extra = plan.overrides(int(config.mesh.dcn_data))
    if rows and plan.gradcache_chunks:  # each chunk is its own packing group: its share of rows
      k = plan.gradcache_chunks
      extra += [f"--config.data.packed_rows={-(-rows[0] // k)}",
                f"--config.data.packed_pair_rows={-(-rows[1] // k)}"]
    cmd = [sys.executable, "-m", "bepa_jax.cli.compile", "--config", args.config,
           "--topology", args.topology, "--slices", str(args.slices),
           "--tokens_per_sentence", str(args.tokens_per_sentence), *overrides, *extra,
           "--out", path]
    lines = []
    try:
      code = libtpu.run_isolated(cmd, path, lines=lines)
    except libtpu.CompilerCrashed:
      code = None  # run_isolated wrote {"failed": "crash"} at path
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    error = next((line for line in reversed(lines) if f"{PROG}: error:" in line),
                 lines[-1] if lines else "")
    if code == cli.EXIT_USAGE:  # bad input the parent's checks did not catch: every plan's
      raise ConfigError(error.split(f"{PROG}: error: ", 1)[-1])
    return dict(failed=f"rc {code}", error=error)
  return compile_fn


def run_search(args, overrides, config, topo) -> int:
  """--search: the grid, each plan in its own child, the ranking printed and written."""
  chips = topo.chips * args.slices
  compile_lib.check(config, chips, args.slices, args.tokens_per_sentence)  # the config as given
  vocab = batch_lib.vocab_size(config)[0]
  shape = search_lib.Shape.of(config, chips, topo.chip.hbm_bytes, vocab)
  with tempfile.TemporaryDirectory(prefix="bepa-search-") as tmp:
    plans_dir = os.path.splitext(args.out)[0] + ".plans" if args.out else tmp
    os.makedirs(plans_dir, exist_ok=True)
    search = search_lib.Search(config, shape, plan_compiler(args, overrides, config, plans_dir),
                               log=lambda m: print(m, file=sys.stderr, flush=True))
    result = search.run()
  where = f"{topo.name}" + (f" x {args.slices}" if args.slices > 1 else "")
  result.update(topology=topo.name, slices=args.slices, chips=chips, config=args.config,
                overrides=list(overrides), tokens_per_sentence=args.tokens_per_sentence,
                plans_dir=plans_dir if args.out else None)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2, default=str)
  print(search_lib.format_result(result, where))
  if args.out:
    print(f"\nwrote {args.out} (each plan's report in {plans_dir}/)")
  if not result["ranked"]:
    cli.fail(PROG, search_lib.nothing_fits(result, where))
    return cli.EXIT_FAILED
  return cli.EXIT_OK


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "JAX_PLATFORMS" not in os.environ:  # the host only lowers: never probe for a local TPU
    jax.config.update("jax_platforms", "cpu")
  cli.setup_logging()
  return cli.guarded(PROG, lambda: run_cli(argv))


def run_isolated(cmd: list[str], out_path: str = "") -> int:
  """libtpu.run_isolated's exit code: a compiler crash is one line and exit 1, Ctrl-C 130
  (the child says it was interrupted)."""
  try:
    return libtpu.run_isolated(cmd, out_path)
  except libtpu.CompilerCrashed as e:
    cli.fail(PROG, e)
    return cli.EXIT_FAILED
  except KeyboardInterrupt:
    return cli.EXIT_INTERRUPTED


def run() -> None:
  """Console entry: the compile runs in a child process (see run_isolated)."""
  if os.environ.get(libtpu.IN_PROCESS) or "--search" in sys.argv[1:]:
    sys.exit(main())  # a search runs each compile in a child itself
  p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  p.add_argument("--out", default="")
  out = p.parse_known_args(sys.argv[1:])[0].out
  sys.exit(run_isolated([sys.executable, "-m", "bepa_jax.cli.compile", *sys.argv[1:]], out))


if __name__ == "__main__":
  run()
