"""In what dtype are the weight gradients summed over the batch shards? A probe, not the model.

  python bench/grad_reduce_dtype.py [--topology v5e-8]

The pod-table reports show every weight-gradient all-reduce of the real step in bf16 on TPU
(docs/pods.md, "The gradient all-reduce runs in bf16"). This isolates why, on one bf16 matmul
y = x @ w.astype(bf16) with an fp32 parameter w, data parallel over 8 shards, in three forms:
  today     : the kernel cast to bf16 and a bf16 dot (model.weight_dot, as flax's Dense does)
  f32 out   : the same dot with preferred_element_type=float32, its output cast back to bf16
  f32 grad  : model.weight_dot with model.weight_grads_fp32: a custom VJP whose weight-gradient
              dot returns fp32 (the activation path stays bf16)
Each is compiled for a TPU slice (libtpu, nothing runs) and for 8 CPU devices; the dtype of the
cross-shard gradient reduction is read from the optimised HLO. On the CPU devices it also runs,
and the weight gradient is compared with an fp32 reference (the error of the per-shard bf16
rounding; TPU's bf16 sum adds to it). Writes bench/results/grad_reduce_dtype.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from bepa_jax import model as model_lib  # noqa: E402

BF16 = jnp.bfloat16
_CFG = model_lib.EncoderConfig(vocab_size=1, dtype="bfloat16")
TODAY, FP32_GRADS = _CFG, dataclasses.replace(_CFG, weight_grads_fp32=True)


def f32_out(x, w):
  return jax.lax.dot(x, w.astype(BF16), preferred_element_type=jnp.float32).astype(BF16)


FORMS = {"today": lambda x, w: model_lib.weight_dot(TODAY, x, w),
         "f32 out": f32_out,
         "f32 grad": lambda x, w: model_lib.weight_dot(FP32_GRADS, x, w)}


def loss(form, w, x):
  return jnp.sum(jnp.square(FORMS[form](x, w).astype(jnp.float32)))


def reductions(devices, form, n, d, f):
  """The cross-shard reductions of d loss / d w in the optimised HLO: 'dtype[shape]' each."""
  mesh = Mesh(np.asarray(devices).reshape(-1), ("data",))
  rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  w = jax.ShapeDtypeStruct((d, f), jnp.float32, sharding=rep)
  x = jax.ShapeDtypeStruct((n, d), BF16, sharding=dat)
  grad = jax.jit(jax.grad(lambda w_, x_: loss(form, w_, x_)), in_shardings=(rep, dat),
                 out_shardings=rep)
  text = grad.lower(w, x).compile().as_text()
  return re.findall(r"= (\w+\[[\d,]*\])\S* (?:all-reduce|reduce-scatter)(?:-start)?\(", text)


def cpu_error(form, n, d, f):
  """Relative error (max |g - ref| / max |ref|) of the weight gradient on 8 CPU shards against
  the same formula in fp32 on one device."""
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (n, d), jnp.float32).astype(BF16)
  w = jax.random.normal(k2, (d, f), jnp.float32) / np.sqrt(d)
  mesh = Mesh(np.asarray(jax.devices("cpu")[:8]), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  g = jax.jit(jax.grad(lambda w_, x_: loss(form, w_, x_)))(w, xs)
  y = x.astype(jnp.float32) @ w.astype(BF16).astype(jnp.float32)
  ref = 2 * x.astype(jnp.float32).T @ y.astype(BF16).astype(jnp.float32)
  return float(jnp.max(jnp.abs(g - ref)) / jnp.max(jnp.abs(ref)))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--topology", default="v5e-8")
  ap.add_argument("--rows", type=int, default=4096, help="the batch's rows (over 8 shards)")
  ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "grad_reduce_dtype.json"))
  args = ap.parse_args(argv)
  from bepa_jax import tpu_specs
  from bepa_jax.aot import libtpu
  tpu = libtpu.topology_devices(tpu_specs.parse(args.topology), 1)[:8]
  n, d, f = args.rows, 768, 3072  # a BERT-base FFN kernel
  rows = []
  for form in FORMS:
    row = dict(form=form, tpu=reductions(tpu, form, n, d, f),
               cpu=reductions(jax.devices("cpu")[:8], form, n, d, f),
               cpu_rel_error=cpu_error(form, n, d, f))
    rows.append(row)
    print(f"{form:9s} | {args.topology}: {', '.join(row['tpu'])} | 8 CPU devices: "
          f"{', '.join(row['cpu'])}, weight-gradient error {row['cpu_rel_error']:.1e}", flush=True)
  with open(args.out, "w") as fh:
    json.dump(dict(topology=args.topology, shape=dict(rows=n, d=d, f=f, shards=8), forms=rows,
                   method=__doc__.split("\n\n")[1:3]), fh, indent=1)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
