"""The global batch bepa-train's pipeline would yield, as abstract arrays: no data is read."""
from __future__ import annotations

import math

import jax

from bepa_jax import mesh as mesh_lib
from bepa_jax.data import batch_spec
from bepa_jax.errors import ConfigError


def vocab_size(config) -> tuple[int, str]:
  """(vocabulary size, where it came from): no tokenizer is read or trained here."""
  if int(config.model.vocab_size) > 0:
    return int(config.model.vocab_size), "model.vocab_size"
  if config.tokenizer.path or config.init.hf_dir:
    where = "tokenizer.path" if config.tokenizer.path else "init.hf_dir"
    raise ConfigError(f"model.vocab_size=0 takes the size from the tokenizer ({where}), which "
                      f"bepa-compile does not read: set --config.model.vocab_size=N")
  return int(config.tokenizer.vocab_size), "tokenizer.vocab_size (the tokenizer bepa-train " \
                                           "would train; at most this many pieces)"


# The pipeline's own description of its batch (data/batch_spec.py): bepa-compile compiles the
# step for exactly what bepa-train would feed it, padded or packed, never a copy of the layout.
packed_rows = batch_spec.configured_rows
batch_shapes = batch_spec.shapes


def token_slots(config, batch_shards: int = 1) -> int:
  """Token positions the sentence passes of one step process (real + padding)."""
  shape = batch_shapes(config, batch_shards)["input_ids"][0]
  return math.prod(shape)


def abstract_batch(config, mesh, batch_shards: int) -> dict:
  sharding = mesh_lib.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in batch_shapes(config, batch_shards).items()}

