"""The global batch bepa-train's pipeline would yield, as shapes: no data is read."""
from __future__ import annotations

import math

import jax
import numpy as np

from bepa_jax import mesh as mesh_lib
from bepa_jax.config import validate as config_lib
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


def packed_rows(config) -> tuple[int, int] | None:
  """(rows per group for the sentence passes, for the TLM pair pass or 0) of a packed config
  whose rows are set, else None (data.packing=False, or rows chosen from the data: 0)."""
  d = config.data
  if not bool(d.get("packing", False)):
    return None
  pair = str(config.loss.mlm_input) == "pair"
  rows = (int(d.packed_rows), int(d.packed_pair_rows) if pair else 0)
  if not rows[0] or (pair and not rows[1]):
    return None
  return rows


def batch_shapes(config, batch_shards: int = 1) -> dict:
  """key -> (shape, dtype) of the global batch the pipeline (data/pair_pipeline.py) yields.

  Packed (data.packing with data.packed_rows set): the token arrays are [G, R, L], G = batch
  shards x micro-batches (one packing group each), with segment ids; the per-pair arrays
  (cls_index, MLM positions, labels) stay [B, ...].
  """
  B, L = int(config.train.global_batch), int(config.data.max_length)
  P = int(config.data.max_predictions_per_seq)
  i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
  pair = str(config.loss.mlm_input) == "pair"
  rows = packed_rows(config)
  if rows is not None:
    G = batch_shards * config_lib.packing_micro_batches(config.train)
    grid = lambda r: ((G, r, L), i32)
    out = {"input_ids": grid(rows[0]), "token_type_ids": grid(rows[0]),
           "attention_mask": grid(rows[0]), "segment_ids": grid(rows[0]),
           "cls_index": ((B, 2), i32), "text_hash": ((B, 2), i32)}
    if pair:
      out.update(mlm_input_ids=grid(rows[1]), mlm_segment_ids=grid(rows[1]),
                 mlm_attention_mask=grid(rows[1]))
    elif str(config.loss.cls_input) == "clean":
      out["mlm_input_ids"] = grid(rows[0])
  else:
    out = {"input_ids": ((B, 2, L), i32), "token_type_ids": ((B, 2, L), i32),
           "attention_mask": ((B, 2, L), i32), "text_hash": ((B, 2), i32)}
    if pair:  # one TLM sequence per pair
      out.update(mlm_input_ids=((B, L), i32), mlm_attention_mask=((B, L), i32))
    elif str(config.loss.cls_input) == "clean":
      out["mlm_input_ids"] = ((B, 2, L), i32)
  preds = (B, 2 * P) if pair else (B, 2, P)  # TLM: 2P predictions per pair sequence
  out.update(mlm_positions=(preds, i32), mlm_ids=(preds, i32), mlm_weights=(preds, f32))
  return out


def token_slots(config, batch_shards: int = 1) -> int:
  """Token positions the sentence passes of one step process (real + padding)."""
  shape = batch_shapes(config, batch_shards)["input_ids"][0]
  return math.prod(shape)


def abstract_batch(config, mesh, batch_shards: int) -> dict:
  sharding = mesh_lib.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in batch_shapes(config, batch_shards).items()}

