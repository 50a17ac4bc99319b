"""Shared pieces of the benchmarks: model shapes, analytic FLOPs, a synthetic batch, our jitted
step, the peak matmul rate, and interleaved timing (the machine is shared: only ratios measured
in the same run, with alternating repetitions, mean anything).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
if REPO not in sys.path:
  sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bepa_jax.config import defaults as default_config  # noqa: E402

# name -> (layers, hidden, heads, intermediate, seq, vocab, pairs per step)
SHAPES = {
    "tiny": dict(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512, seq=64,
                 vocab_size=32000, pairs=16),
    "small": dict(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024, seq=128,
                  vocab_size=32000, pairs=16),
    "base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072, seq=128,
                 vocab_size=32000, pairs=16),
}


def n_predictions(seq: int) -> int:
  """BERT's 15% of the tokens between [CLS] and [SEP] (every sentence is full length here)."""
  return max(1, round(0.15 * (seq - 2)))


def make_config(name: str, pairs: int = 0, **model_overrides):
  """The config of a SHAPES entry; `pairs` > 0 replaces its pairs per step."""
  s = SHAPES[name]
  c = default_config.get_config()
  for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size"):
    c.model[k] = s[k]
  c.model.max_position_embeddings = max(512, s["seq"])
  for k, v in model_overrides.items():
    c.model[k] = v
  c.data.max_length = s["seq"]
  c.data.max_predictions_per_seq = n_predictions(s["seq"])
  c.data.packing = False  # the padded step (and its [B, 2, L] layout) is what this compares
  c.train.global_batch = pairs or s["pairs"]
  c.mesh.data = 1
  return c


def train_flops(config) -> dict:
  """Model FLOPs of one train step (forward + backward = 3x forward matmul FLOPs) of the
  synthetic batch: every sentence full length, every prediction real.

  bepa_jax/aot/flops.py's count: QKV, attention scores and context, output projection, MLP, the
  MLM head at the masked positions only (dense + tied decoder), the b x B contrastive logits.
  Element-wise work (softmax, GELU, LayerNorm, the optimizer) is not model FLOPs.
  """
  from bepa_jax.aot import flops as flops_lib
  m = config.model
  L, B = config.data.max_length, config.train.global_batch
  fl = flops_lib.model_flops(
      hidden=m.hidden_size, layers=m.num_layers, intermediate=m.intermediate_size,
      vocab=m.vocab_size, pairs=B, tokens_per_sentence=L,
      predictions_per_sentence=config.data.max_predictions_per_seq)
  encoder = fl["dense"] + fl["attention"]
  return dict(forward=fl["total"] / 3, step=fl["total"], encoder=encoder,
              mlm_head=fl["mlm_head"], contrastive=fl["contrastive"], tokens=2 * B * L,
              sequences=2 * B)


def synthetic_batch(config, seed: int = 0) -> dict:
  """A [B, 2, L] batch like the pipeline's: full-length sentences, 15% masked positions."""
  rng = np.random.default_rng(seed)
  B, L = config.train.global_batch, config.data.max_length
  P = config.data.max_predictions_per_seq
  V = config.model.vocab_size
  ids = rng.integers(5, V, size=(B, 2, L)).astype(np.int32)
  ids[..., 0], ids[..., -1] = 2, 3  # [CLS] ... [SEP]
  pos = np.stack([np.sort(rng.choice(np.arange(1, L - 1), P, replace=False))
                  for _ in range(2 * B)]).reshape(B, 2, P).astype(np.int32)
  labels = np.take_along_axis(ids, pos, axis=2)
  ids_masked = ids.copy()
  np.put_along_axis(ids_masked, pos, 4, axis=2)  # [MASK]
  return dict(input_ids=ids_masked, token_type_ids=np.zeros_like(ids),
              attention_mask=np.ones_like(ids), mlm_positions=pos, mlm_ids=labels,
              mlm_weights=np.ones((B, 2, P), np.float32))


def build_jax_step(config, devices=None):
  """(step_fn, state, device batch, compile seconds, memory dict) for `config` on `devices`."""
  from bepa_jax import mesh as mesh_lib
  from bepa_jax.training import step as step_lib
  from bepa_jax.trainer import loop
  from bepa_jax.training import state as train_state
  from bepa_jax.model import BepaEncoder, EncoderConfig

  devices = devices or jax.devices()[:1]
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  model = BepaEncoder(EncoderConfig.from_config(config.model))
  tx = train_state.create_optimizer(config.optim, 1000)
  state, shardings = train_state.create_sharded_state(
      model, tx, train_state.example_inputs(config), jax.random.key(0), mesh, config.mesh)
  step_fn = step_lib.make_train_step(model, config, mesh, shardings)
  batch = loop.global_batch(synthetic_batch(config), mesh)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  return compiled, state, batch, mesh, compile_s, memory(compiled)


def step_runner(compiled, state, batch, mesh):
  """A fn that runs one step of `compiled` on the donated state it holds and waits for it."""
  holder = {"state": state}

  def run():
    with jax.set_mesh(mesh):
      holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics)
  return run


def memory(compiled) -> dict:
  """XLA's compiled memory analysis: peak ~ arguments + outputs - aliased (donated) + temps."""
  ma = compiled.memory_analysis()
  out = {k: int(getattr(ma, k + "_in_bytes", 0) or 0)
         for k in ("argument_size", "output_size", "alias_size", "temp_size",
                   "generated_code_size")}
  out["peak_bytes"] = (out["argument_size"] + out["output_size"] - out["alias_size"]
                       + out["temp_size"])
  return out


def jax_matmul(n: int = 2048, dtype=jnp.float32):
  """A jitted n x n x n matmul in `dtype` and its FLOPs: the XLA peak in this run (the
  model's dtype: bfloat16 on an accelerator's matrix units)."""
  a = jax.random.normal(jax.random.key(1), (n, n), dtype)
  b = jax.random.normal(jax.random.key(2), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  return (lambda: f(a, b).block_until_ready()), 2 * n ** 3


class MatmulPeak:
  """The XLA fp32 matmul peak, measured robustly: each call runs jitted n x n x n matmuls of
  several sizes, `reps` times each; the peak is the best rate of any of them over all calls.

  Put it among the interleaved fns, so that it samples the machine between steps all run long:
  one size, timed once per repetition, can land in a stall every time (a base-config run here
  once measured 38 GFLOP/s on a machine that reaches 190) and inflate MFU past 100%.
  """

  def __init__(self, sizes=(512, 1024, 2048), reps: int = 2, dtype=jnp.float32):
    self.reps, self.samples, self.fns = reps, [], []
    for n in sizes:
      fn, flops = jax_matmul(n, dtype)
      self.fns.append((fn, flops))

  def __call__(self):
    for fn, flops in self.fns:
      for _ in range(self.reps):
        t0 = time.perf_counter()
        fn()
        self.samples.append((flops, time.perf_counter() - t0))

  @property
  def best(self) -> float:
    return peak_rate(self.samples)


def peak_rate(samples) -> float:
  """The best FLOP/s of (flops, seconds) samples: a stall only slows a sample down."""
  return max(flops / seconds for flops, seconds in samples if seconds > 0)


def mfu_peak(measured: float, achieved: dict) -> dict:
  """The MFU denominator: the measured matmul peak, unless a step ran faster than it.

  `achieved`: {step name: model FLOP/s at its fastest repetition}. A step cannot beat the
  machine's peak, so if one does, the measurement was disturbed: the peak is reported as
  unreliable and the fastest achieved rate is used instead, a lower bound of the true peak
  (the MFU figures are then upper bounds). Every MFU = FLOPs / median step time / peak <= 1.
  """
  name, top = max(achieved.items(), key=lambda kv: kv[1]) if achieved else ("", 0.0)
  reliable = top <= measured
  note = "" if reliable else (
      f"matmul peak unreliable: measured {measured / 1e9:.0f} GFLOP/s, but {name} reached "
      f"{top / 1e9:.0f} GFLOP/s of model FLOPs; that rate is used as a lower bound of the "
      f"peak, so the MFU figures are upper bounds")
  return dict(peak=measured if reliable else top, measured=measured, reliable=reliable,
              bound_by=None if reliable else name, note=note)


def interleaved(fns: dict, reps: int, warmup: int = 1, label: str | None = None) -> dict:
  """Runs every fn once per repetition, in turn; returns {name: [seconds, ...]}.

  A fn with `reports_seconds = True` (a worker process) returns its own measured time, so
  the pipe round trip is not counted. With `label`, one progress line per repetition.
  """
  for _ in range(warmup):
    for f in fns.values():
      f()
  times = {k: [] for k in fns}
  for rep in range(reps):
    for k, f in fns.items():
      t0 = time.perf_counter()
      r = f()
      elapsed = time.perf_counter() - t0
      times[k].append(float(r) if getattr(f, "reports_seconds", False) else elapsed)
    if label is not None:
      print(f"  [{label}] rep {rep + 1}/{reps}: "
            + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()), flush=True)
  return times


def median(xs):
  return statistics.median(xs)


def machine_info() -> dict:
  load = os.getloadavg()
  return dict(cpu=_cpu_name(), cores=os.cpu_count(),
              loadavg_1_5_15=[round(x, 2) for x in load], jax=jax.__version__,
              backend=jax.default_backend(), devices=len(jax.devices()),
              device_kind=jax.devices()[0].device_kind,
              xla_flags=os.environ.get("XLA_FLAGS", ""))


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def save_json(name: str, payload: dict, results_dir: str = RESULTS) -> str:
  os.makedirs(results_dir, exist_ok=True)
  path = os.path.join(results_dir, name)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, default=float)
  return path
