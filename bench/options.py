"""The model's speed / memory options, each against the default, in the same run.

  python bench/options.py                      # small config, every option, 3 interleaved reps
  python bench/options.py --reps 5 --scan_layers_depth 24

Per option: compile time, XLA's compiled peak memory and temporaries (what remat saves),
median step time relative to the default (interleaved repetitions: the machine is shared).
Then `nn.scan` over layers vs. unrolled layers at --scan_layers_depth layers: compile time
only (the point of scan). Writes bench/results/options.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from bepa_jax import host_memory  # noqa: E402

OPTIONS = {
    "default (fp32)": {},
    "bf16 compute, fp32 params": {"dtype": "bfloat16"},
    "remat full": {"remat": "full"},
    "remat dots_saveable": {"remat": "dots_saveable"},
    "scan_layers": {"scan_layers": True},
    "fused_qkv": {"fused_qkv": True},
}


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench/options.py")
  p.add_argument("--config", default="small", choices=sorted(harness.SHAPES))
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--only", default="", help="comma list of option names to run (default: all)")
  p.add_argument("--scan_layers_depth", type=int, default=24, help="0 skips the compile study")
  p.add_argument("--host_malloc", choices=host_memory.MODES, default="auto",
                 help="glibc settings (bepa_jax/host_memory.py), as bepa-train applies them")
  args = p.parse_args(argv)
  host_memory.configure(args.host_malloc)  # before XLA starts its threads
  names = [n for n in OPTIONS if not args.only or n in args.only.split(",")]
  fns, rows = {}, {}
  for name in names:
    cfg = harness.make_config(args.config, **OPTIONS[name])
    compiled, state, batch, mesh, compile_s, mem = harness.build_jax_step(cfg)
    fns[name] = harness.step_runner(compiled, state, batch, mesh)
    rows[name] = dict(overrides=OPTIONS[name], compile_s=compile_s, memory=mem)
    print(f"compiled {name}: {compile_s:.1f}s, peak {mem['peak_bytes'] / 2**20:.0f} MiB, "
          f"temps {mem['temp_size'] / 2**20:.0f} MiB", flush=True)
  times = harness.interleaved(fns, args.reps, warmup=1)
  base = harness.median(times[names[0]])
  flops = harness.train_flops(harness.make_config(args.config))["tokens"]
  print(f"\n{'option':28s} {'step ms':>8s} {'vs default':>10s} {'tok/s':>7s} {'compile s':>9s} "
        f"{'peak MiB':>8s} {'temps MiB':>9s}")
  for name in names:
    r = rows[name]
    r.update(times_s=times[name], step_s=harness.median(times[name]))
    r["speedup"] = base / r["step_s"]
    r["tokens_per_s"] = flops / r["step_s"]
    print(f"{name:28s} {r['step_s'] * 1e3:8.0f} {r['speedup']:9.2f}x {r['tokens_per_s']:7.0f} "
          f"{r['compile_s']:9.1f} {r['memory']['peak_bytes'] / 2**20:8.0f} "
          f"{r['memory']['temp_size'] / 2**20:9.0f}")
  out = dict(machine=harness.machine_info(), config=args.config, reps=args.reps,
             host_malloc=args.host_malloc, host_malloc_applied=host_memory.applied(),
             options=rows)
  if args.scan_layers_depth:
    out["scan_compile"] = {}
    for scan in (False, True):
      cfg = harness.make_config(args.config, num_layers=args.scan_layers_depth, scan_layers=scan)
      t0 = time.perf_counter()
      _, _, _, _, compile_s, mem = harness.build_jax_step(cfg)
      key = "scan" if scan else "unrolled"
      out["scan_compile"][key] = dict(compile_s=compile_s, build_s=time.perf_counter() - t0,
                                      memory=mem)
      print(f"{args.scan_layers_depth} layers, {key:8s}: compile {compile_s:.1f}s "
            f"(with init {time.perf_counter() - t0:.1f}s), peak {mem['peak_bytes'] / 2**20:.0f} MiB",
            flush=True)
  out["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
  print("saved", harness.save_json(f"options_{args.config}.json", out))


if __name__ == "__main__":
  main()
