"""The real train step compiled by XLA:TPU for a TPU slice, on this machine (no TPU needed).

libtpu describes the slice (compile-only devices), the state and batch are ShapeDtypeStructs
carrying the run's shardings, and the step is training/state.py's (model_parts) and
training/step.py's (make_train_step): nothing is allocated or downloaded. See report.py for
what the compiled step reports.
"""
from __future__ import annotations

import logging
import math
import time

import jax
import numpy as np

from bepa_jax import hlo_stats
from bepa_jax import mesh as mesh_lib
from bepa_jax import tpu_specs
from bepa_jax.aot import batch as batch_lib
from bepa_jax.aot import libtpu
from bepa_jax.aot import report as report_lib
from bepa_jax.config import validate as config_lib
from bepa_jax.errors import BepaError, ConfigError, one_line
from bepa_jax.hf import init as hf_init
from bepa_jax.model import EncoderConfig
from bepa_jax.training import state as train_state
from bepa_jax.training import step as step_lib

log = logging.getLogger("bepa")


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (its shards)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return int(total)


def layout(config):
  """(config, layout): data.packing compiles the packed layout ([G, R, L] rows, block-diagonal
  attention) when its rows are given (data.packed_rows, and data.packed_pair_rows for TLM).
  With rows chosen from the data at start-up (0, the default) there is no data to choose them
  from: the padded layout is compiled, an upper bound (the packing fallback is that shape)."""
  if not bool(config.data.get("packing", False)):
    return config, "padded"
  rows = batch_lib.packed_rows(config)
  if rows is None:
    config = config.copy_and_resolve_references()
    config.data.packing = False
    name = ("padded: the upper bound of data.packing with rows chosen from the data "
            "(set --config.data.packed_rows=R, from bepa-train's `packing:` line, for the "
            "packed layout)")
  else:
    name = f"packed ({rows[0]} rows per group" + (
        f", {rows[1]} TLM rows" if rows[1] else "") + ")"
  log.info("bepa-compile: layout %s", name)
  return config, name


def check(config, num_devices: int, slices: int, tokens_per_sentence: float):
  """The config's one validation pass (init.hf_dir's shape first, as bepa-train's), and the
  flags that must agree with it; returns the mesh shape."""
  L = int(config.data.max_length)
  if tokens_per_sentence > L:
    raise ConfigError(f"--tokens_per_sentence={tokens_per_sentence:g} is more than "
                      f"data.max_length={L}")
  if slices > 1 and int(config.mesh.dcn_data) != slices:
    raise ConfigError(f"--slices={slices} needs --config.mesh.dcn_data={slices} (the data axis "
                      f"spans the slices), got mesh.dcn_data={config.mesh.dcn_data}")
  if config.init.hf_dir:
    hf_init.apply_to_config(config)
  return config_lib.validate(config, num_devices)


def compile_step(config, topo: tpu_specs.Topology, slices: int = 1, hlo_path: str = "",
                 tokens_per_sentence: float = 0.0) -> dict:
  """Compiles the configured train step for `slices` x `topo`; returns the report dict.

  The layout is `layout`'s (the report says which). `tokens_per_sentence` (mean real tokens
  with [CLS]/[SEP], from the data) turns pairs/s into real tokens/s; without it only token
  positions/s (padding included) are reported.
  """
  # libtpu's compile-only client can neither read nor usefully write persistent cache entries
  cache_on = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return _compile_step(config, topo, slices, hlo_path, tokens_per_sentence)
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_on)


def _compile_step(config, topo, slices, hlo_path, tokens_per_sentence):
  config, layout_name = layout(config)
  devices = libtpu.topology_devices(topo, slices)
  shape = check(config, len(devices), slices, tokens_per_sentence)
  B = int(config.train.global_batch)
  vocab, vocab_from = batch_lib.vocab_size(config)
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  model_cfg = EncoderConfig.from_config(config.model, vocab_size=vocab)
  parts = train_state.model_parts(config, model_cfg, mesh)
  state, shardings = train_state.abstract_state(*parts.init_args, **parts.init_kwargs)
  step_fn = step_lib.make_train_step(parts.model, config, mesh, shardings, parts.schedule)
  shards = shape[0] * shape[1]  # data x fsdp: the batch shards, one packing group each
  batch = batch_lib.abstract_batch(config, mesh, shards)
  slots = batch_lib.token_slots(config, shards)
  if 2 * B * tokens_per_sentence > slots:
    raise ConfigError(f"--tokens_per_sentence={tokens_per_sentence:g}: {2 * B} sentences hold "
                      f"{2 * B * tokens_per_sentence:,.0f} real tokens, more than the {slots:,} "
                      f"positions of the packed rows (data.packed_rows={config.data.packed_rows})")
  log.info("compiling the train step for %s x %d (%d chips, mesh %s) with XLA:TPU ...",
           topo.name, slices, len(devices), dict(zip(mesh_lib.AXES, shape)))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = step_fn.lower(state, batch)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      oom = hlo_stats.oom_bytes(str(e))
      if oom is None:
        raise BepaError(f"XLA:TPU could not compile the step for {topo.name}: "
                        f"{one_line(e)}") from None
      compiled = None
  compile_s = time.perf_counter() - t0
  sizes = dict(
      params=bytes_per_device(state.params), opt_state=bytes_per_device(state.opt_state),
      ema_params=bytes_per_device(state.ema_params) if state.ema_params is not None else 0,
      batch=bytes_per_device(batch))
  info = dict(topology=topo.name, slices=slices, chips=len(devices), chip=topo.chip.kind,
              topology_name=topo.topology_name, mesh=dict(zip(mesh_lib.AXES, shape)),
              vocab_size=vocab, vocab_from=vocab_from,
              params=train_state.count_params(state.params),
              global_batch=B, max_length=int(config.data.max_length), compile_s=compile_s,
              dtype=str(config.model.dtype), remat=str(config.model.remat),
              contrastive_chunk=int(config.loss.contrastive_chunk), layout=layout_name,
              token_slots_per_step=slots,
              tokens_per_sentence=float(tokens_per_sentence),
              state_bytes_per_chip=sizes)
  if compiled is None:
    return report_lib.report_oom(info, topo, oom)
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(compiled.as_text())
  return report_lib.report(info, config, topo, compiled, model_cfg)
