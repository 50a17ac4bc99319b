"""Compiled per-device memory of the contrastive loss + its gradient as the global batch grows.

  python bench/contrastive_memory.py                 # B = 1k .. 65,536 pairs, D = 768, 8 devices
  python bench/contrastive_memory.py --chunk 2048 --budget_gib 1

Nothing runs: every form is lowered and compiled on 8 simulated CPU devices and XLA's own
memory analysis (temporaries + arguments + outputs, per device) is read back. Forms:
  global  : infonce.infonce_reference on one device (B x B logits): what must never happen
  sharded : infonce.sharded_infonce (b x B logits per device, b = B / 8)
  chunked : the same with Options(chunk=...) (b x chunk logits per device, streaming LSE)
Writes bench/results/contrastive_memory.json and .png.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import jax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from bepa_jax.objective import infonce  # noqa: E402


def compiled_bytes(fn, B, D, mesh=None):
  shape = jax.ShapeDtypeStruct((B, D), jax.numpy.float32,
                               sharding=NamedSharding(mesh, P("data")) if mesh else None)
  grad = jax.jit(jax.value_and_grad(lambda a, b: fn(a, b)["contrastive_loss"], argnums=(0, 1)))
  if mesh is None:
    compiled = grad.lower(shape, shape).compile()
  else:
    with jax.set_mesh(mesh):
      compiled = grad.lower(shape, shape).compile()
  return harness.memory(compiled)


def main(argv=None):
  p = argparse.ArgumentParser(prog="bench/contrastive_memory.py")
  p.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768,65536")
  p.add_argument("--dim", type=int, default=768)
  p.add_argument("--chunk", type=int, default=1024)
  p.add_argument("--budget_gib", type=float, default=1.0,
                 help="per-device memory allowed to the loss (marks which forms fit)")
  p.add_argument("--global_max", type=int, default=65536, help="largest B for the 1-device form")
  args = p.parse_args(argv)
  n = 8
  if len(jax.devices()) < n:
    p.error(f"needs {n} devices, found {len(jax.devices())} (XLA_FLAGS was set before this ran?)")
  mesh = jax.make_mesh((n, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  tau, D = 0.07, args.dim
  rows = []
  print(f"{'B':>6} {'b':>5} | {'global 1-dev':>12} | {'sharded':>10} {'/(b*B*4)':>8} | "
        f"{'chunked':>10} | MiB per device, loss + gradient, D={D}, chunk={args.chunk}")
  for B in [int(s) for s in args.sizes.split(",")]:
    b = B // n
    row = dict(B=B, b=b, D=D, chunk=min(args.chunk, B))
    if B <= args.global_max:
      row["global"] = compiled_bytes(lambda x, y: infonce.infonce_reference(x, y, tau), B, D)
    row["sharded"] = compiled_bytes(lambda x, y: infonce.sharded_infonce(x, y, tau, mesh),
                                    B, D, mesh)
    row["chunked"] = compiled_bytes(
        lambda x, y: infonce.sharded_infonce(x, y, tau, mesh, infonce.Options(chunk=row["chunk"])), B, D, mesh)
    mib = lambda k: row[k]["peak_bytes"] / 2**20 if k in row else float("nan")
    row["sharded_bytes_per_bB_float"] = row["sharded"]["peak_bytes"] / (b * B * 4)
    print(f"{B:6d} {b:5d} | {mib('global'):12.0f} | {mib('sharded'):10.0f} "
          f"{row['sharded_bytes_per_bB_float']:8.2f} | {mib('chunked'):10.0f}", flush=True)
    rows.append(row)
  budget = args.budget_gib * 2**30
  for form in ("global", "sharded", "chunked"):
    fits = [r["B"] for r in rows if form in r and r[form]["peak_bytes"] <= budget]
    print(f"largest B within {args.budget_gib:g} GiB per device, {form}: {max(fits) if fits else '-'}")
  out = dict(machine=harness.machine_info(), devices=n, dim=D, chunk=args.chunk,
             budget_gib=args.budget_gib, rows=rows)
  print("saved", harness.save_json("contrastive_memory.json", out))
  plot(rows, n, D, budget)


def plot(rows, n, D, budget):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  Bs = [r["B"] for r in rows]
  for form, style in (("global", "o-"), ("sharded", "s-"), ("chunked", "^-")):
    pts = [(r["B"], r[form]["peak_bytes"] / 2**20) for r in rows if form in r]
    ax.plot(*zip(*pts), style, label={"global": "global view, 1 device (B x B)",
                                      "sharded": f"sharded, per device (b x B, b = B/{n})",
                                      "chunked": "chunked LSE, per device"}[form])
  ax.plot(Bs, [B * B * 4 / 2**20 for B in Bs], "k:", lw=1, label="one B x B fp32 buffer")
  ax.plot(Bs, [B / n * B * 4 / 2**20 for B in Bs], "k--", lw=1, label="one b x B fp32 buffer")
  ax.axhline(budget / 2**20, color="r", lw=0.8, label=f"budget {budget / 2**30:g} GiB")
  ax.set(xscale="log", yscale="log", xlabel="global batch B (pairs)",
         ylabel="compiled memory, MiB", title=f"InfoNCE loss + gradient, D={D}, {n} devices")
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(harness.RESULTS, "contrastive_memory.png")
  fig.savefig(path, dpi=120)
  print("saved", path)


if __name__ == "__main__":
  main()
