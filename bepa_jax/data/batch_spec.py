"""The one description of a batch: its keys, shapes and dtypes in every layout.

The pipeline (data/pair_pipeline.py) yields these arrays (numpy, on the host), the train step
(training/step.py) and the objective read them, the model is initialised from them
(`example_inputs`), the throughput counters count their encoder passes (`encoder_mask_keys`)
and bepa-compile builds abstract batches from them (`shapes`). B = sentence pairs (of the global
batch, or of one process's rows), L = data.max_length, P = data.max_predictions_per_seq:

  padded (data.packing=False)
    input_ids, token_type_ids, attention_mask  [B, 2, L]   side 0 = x, side 1 = y
    mlm_input_ids (loss.cls_input=clean)       [B, 2, L]   the masked sentences (own MLM pass)
    text_hash                                  [B, 2]      crc32 of each side's tokens
    mlm_positions, mlm_ids, mlm_weights        [B, 2, P]   weights 1.0 where a prediction is real
  TLM (loss.mlm_input=pair): one `[CLS] x [SEP] [CLS] y [SEP]` sequence per pair, masked jointly
    mlm_input_ids, mlm_attention_mask          [B, L]
    mlm_positions, mlm_ids, mlm_weights        [B, 2P]
  packed (data.packing, data/packing.py): the token grids are [G, R, L] (G packing groups,
  R rows each) with segment_ids; cls_index [B, 2] and mlm_positions index each group's R x L
  grid; the TLM grid has R2 rows and its own mlm_segment_ids; the per-pair keys keep [B, ...].

Every array is int32 except mlm_weights (float32).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from bepa_jax.config import validate as config_lib

CLS_INPUTS = ("masked", "clean")   # loss.cls_input: what the contrastive [CLS] pass sees
MLM_INPUTS = ("sentence", "pair")  # loss.mlm_input: each side alone, or [CLS] x [SEP] [CLS] y [SEP]
ENCODER_KEYS = ("input_ids", "token_type_ids", "attention_mask", "mlm_positions")
INT, FLOAT = np.dtype(np.int32), np.dtype(np.float32)


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """The layout of a batch of `pairs` pairs; `rows` = (R, R2) per group when packed (R2 = 0
  without TLM) into `groups` groups, None when padded."""
  pairs: int
  max_length: int
  max_predictions: int
  cls_input: str = "masked"
  mlm_input: str = "sentence"
  rows: tuple[int, int] | None = None
  groups: int = 1

  @property
  def packed(self) -> bool:
    return self.rows is not None

  @property
  def tlm(self) -> bool:
    return self.mlm_input == "pair"

  @property
  def separate_mlm_pass(self) -> bool:
    """MLM runs on its own grid: the masked sentences, or the TLM pair grid."""
    return self.cls_input == "clean"

  def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """key -> (shape, dtype) of every array of the batch."""
    B, L, P = self.pairs, self.max_length, self.max_predictions
    if self.packed:
      grid = lambda r: ((self.groups, r, L), INT)
      R, R2 = self.rows
      out = {"input_ids": grid(R), "token_type_ids": grid(R), "attention_mask": grid(R),
             "segment_ids": grid(R), "cls_index": ((B, 2), INT)}
      if self.tlm:
        out.update(mlm_input_ids=grid(R2), mlm_segment_ids=grid(R2), mlm_attention_mask=grid(R2))
    else:
      grid = lambda r: ((B, 2, L), INT)
      out = {"input_ids": grid(0), "token_type_ids": grid(0), "attention_mask": grid(0)}
      if self.tlm:  # one pair sequence per pair
        out.update(mlm_input_ids=((B, L), INT), mlm_attention_mask=((B, L), INT))
    if self.separate_mlm_pass and not self.tlm:
      out["mlm_input_ids"] = out["input_ids"]
    out["text_hash"] = ((B, 2), INT)
    preds = (B, 2 * P) if self.tlm else (B, 2, P)  # TLM: 2P predictions per pair sequence
    out.update(mlm_positions=(preds, INT), mlm_ids=(preds, INT), mlm_weights=(preds, FLOAT))
    return out

  def mismatches(self, batch: dict) -> list[str]:
    """What of `batch` differs from this spec (missing, extra, other shape or dtype)."""
    want = self.shapes()
    out = [f"{k}: missing" for k in want if k not in batch]
    out += [f"{k}: not in the spec" for k in batch if k not in want]
    for k, (shape, dtype) in want.items():
      if k in batch:
        a = np.asarray(batch[k])
        if (a.shape, a.dtype) != (shape, dtype):
          out.append(f"{k}: {a.dtype}{list(a.shape)}, spec {dtype}{list(shape)}")
    return out


def encoder_mask_keys(cls_input: str, mlm_input: str, ema: bool) -> tuple[str, ...]:
  """The non-pad mask of the grid of each encoder pass the objective runs (objective/loss.py):
  the [CLS] pass; with cls_input=clean the MLM pass (the masked sentences share the sentence
  grid; TLM has a grid of its own); the EMA target's forward pass of the [CLS] input."""
  keys = ["attention_mask"]
  if cls_input == "clean":
    keys.append("mlm_attention_mask" if mlm_input == "pair" else "attention_mask")
  if ema:
    keys.append("attention_mask")
  return tuple(keys)


def packed_rows_of(batch: dict) -> tuple[int, int]:
  """(R, R2) of a packed batch: the rows of its sentence grid and of its TLM grid (or 0)."""
  pair = batch["mlm_input_ids"].shape[1] if "mlm_segment_ids" in batch else 0
  return int(batch["input_ids"].shape[1]), int(pair)


def configured_rows(config) -> tuple[int, int] | None:
  """(R, R2) of a packed config whose rows are set, else None (data.packing=False, or rows
  chosen from the data at start-up: data.packed_rows=0)."""
  d = config.data
  if not bool(d.packing):
    return None
  pair = str(config.loss.mlm_input) == "pair"
  rows = (int(d.packed_rows), int(d.packed_pair_rows) if pair else 0)
  if not rows[0] or (pair and not rows[1]):
    return None
  return rows


def from_config(config, batch_shards: int = 1, rows: tuple[int, int] | None = None
                ) -> BatchSpec:
  """The global batch of `config`: packed when data.packing and its rows are known (`rows`, else
  the configured ones), otherwise padded. G = batch shards x micro-batches (or GradCache
  chunks)."""
  if rows is None:
    rows = configured_rows(config)
  elif not bool(config.data.packing):
    rows = None
  pair = str(config.loss.mlm_input) == "pair"
  return BatchSpec(
      pairs=int(config.train.global_batch), max_length=int(config.data.max_length),
      max_predictions=int(config.data.max_predictions_per_seq),
      cls_input=str(config.loss.cls_input), mlm_input=str(config.loss.mlm_input),
      rows=None if rows is None else (int(rows[0]), int(rows[1]) if pair else 0),
      groups=batch_shards * config_lib.packing_micro_batches(config.train))


def shapes(config, batch_shards: int = 1, rows: tuple[int, int] | None = None) -> dict:
  """key -> (shape, dtype) of the global batch of `config` (see `from_config`)."""
  return from_config(config, batch_shards, rows).shapes()


def example_inputs(max_length: int, max_predictions: int) -> dict:
  """The encoder's init arguments: one pair of the padded layout, its two sentences as rows
  ([2, L], [2, P]), every position real."""
  spec = BatchSpec(1, max_length, max_predictions).shapes()
  out = {k: np.zeros(spec[k][0][1:], spec[k][1]) for k in ENCODER_KEYS}
  out["attention_mask"][:] = 1
  return out
