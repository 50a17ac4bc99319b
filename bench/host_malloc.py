"""Our train step under glibc's default allocator and under `retain` (bepa_jax/host_memory.py).

  python bench/host_malloc.py                 # small config, 7 steps per setting
  python bench/host_malloc.py --config tiny --steps 11

The setting must be made before XLA starts its threads, so each runs in a fresh process, one
after the other (not interleaved: run it on a quiet machine). Prints the median step time, the
minor page faults and the kernel CPU time per step; writes bench/results/host_malloc_<config>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))



def _child(config_name: str, steps: int, malloc: str) -> dict:
  """In the child process: set the allocator, build our step, time it."""
  import resource
  import statistics
  import time

  from bepa_jax import host_memory
  host_memory.configure(malloc)
  import harness
  config = harness.make_config(config_name)
  compiled, state, batch, mesh, _, mem = harness.build_jax_step(config)
  run = harness.step_runner(compiled, state, batch, mesh)

  for _ in range(2):
    run()
  times, faults, sys_s = [], [], []
  for _ in range(steps):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    faults.append(r1.ru_minflt - r0.ru_minflt)
    sys_s.append(r1.ru_stime - r0.ru_stime)
  return dict(step_s=statistics.median(times), times_s=times, temp_bytes=mem["temp_size"],
              minor_faults_per_step=statistics.median(faults),
              kernel_cpu_s_per_step=statistics.median(sys_s))


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench/host_malloc.py", description=__doc__.splitlines()[0])
  p.add_argument("--config", default="small", choices=("tiny", "small", "base"))
  p.add_argument("--steps", type=int, default=7)
  p.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(_child(args.config, args.steps, args.child)))
    return
  import harness
  rows = {}
  for m in ("retain", "system"):
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--config", args.config,
                        "--steps", str(args.steps), "--child", m],
                       capture_output=True, text=True, check=True)
    rows[m] = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"host_malloc={m:7s} {rows[m]['step_s'] * 1e3:7.0f} ms/step  "
          f"{rows[m]['minor_faults_per_step']:8.0f} page faults/step  "
          f"{rows[m]['kernel_cpu_s_per_step']:5.2f} s kernel CPU/step  "
          f"(XLA temporaries {rows[m]['temp_bytes'] / 2**20:.0f} MiB)", flush=True)
  print(f"retain is {rows['system']['step_s'] / rows['retain']['step_s']:.2f}x faster")
  out = dict(machine=harness.machine_info(), config=args.config, steps=args.steps, settings=rows)
  print("saved", harness.save_json(f"host_malloc_{args.config}.json", out))


if __name__ == "__main__":
  main()
