"""Honest throughput: real (non-pad) tokens of a step and the tokens its encoder passes process.

Counted on the host from the numpy batch, before it goes to the devices (a few sums per step).
The contract with the pipeline (padded or packed; data/batch_spec.py): `attention_mask` is the
0/1 non-pad indicator of the token grid the encoder processes, and `mlm_attention_mask` that of
the separate MLM pass when it has a grid of its own (loss.mlm_input=pair). So:

  real       = attention_mask.sum(): the sentence tokens (x and y, with [CLS]/[SEP]) of the step,
               the data rate every framework is compared on (bench/authors_step.py counts the same);
  processed  = the sizes of the grids of every encoder pass the objective runs
               (objective/loss.py Objective.encode and .target): one pass with loss.cls_input=
               masked; with clean, the clean x/y pass plus the MLM pass (over the sentences, or
               over the pair grid with mlm_input=pair); the EMA target's forward pass, if any;
  nonpad     = the non-pad tokens of those same passes; padding fraction = 1 - nonpad/processed.

Recomputation (GradCache's second forward, remat) is how a pass is computed, not another pass:
it is not counted, as MFU conventions do not count it either.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from bepa_jax.data import batch_spec


def encoder_masks(batch: dict, loss_cfg) -> list:
  """The non-pad masks of the grids the step's encoder passes run over, one per pass (which
  passes run: data/batch_spec.py's encoder_mask_keys)."""
  keys = batch_spec.encoder_mask_keys(str(loss_cfg.cls_input), str(loss_cfg.mlm_input),
                                      ema=float(loss_cfg.ema_decay) > 0.0)
  return [batch[k] for k in keys]


@dataclasses.dataclass
class TokenCounts:
  """Token counts of one or more steps (summable); see the module docstring."""
  real: int = 0
  nonpad: int = 0
  processed: int = 0

  def __add__(self, other: "TokenCounts") -> "TokenCounts":
    return TokenCounts(self.real + other.real, self.nonpad + other.nonpad,
                       self.processed + other.processed)

  @property
  def padding_fraction(self) -> float:
    """Share of the processed tokens that are padding (0 = none); NaN before any step."""
    return 1.0 - self.nonpad / self.processed if self.processed else float("nan")

  def as_array(self) -> np.ndarray:
    return np.array([self.real, self.nonpad, self.processed], np.int64)


def count(batch: dict, loss_cfg) -> TokenCounts:
  """Counts of one (process-local or global) host batch."""
  masks = encoder_masks(batch, loss_cfg)
  return TokenCounts(real=int(np.asarray(batch["attention_mask"]).sum()),
                     nonpad=sum(int(np.asarray(m).sum()) for m in masks),
                     processed=sum(int(np.asarray(m).size) for m in masks))


def global_counts(local: TokenCounts) -> TokenCounts:
  """The sum over processes of each one's counts of its own rows.

  Every process holds only its shard of the batch, so its counts are its own; with more than
  one process one all-gather of three integers (every process calls this at the same steps:
  the log steps) makes them the global batch's. One process: returned as is.
  """
  import jax
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils
  gathered = np.asarray(multihost_utils.process_allgather(local.as_array()))
  real, nonpad, processed = (int(v) for v in gathered.reshape(-1, 3).sum(0))
  return TokenCounts(real, nonpad, processed)


class TokenMeter:
  """Accumulates this process's counts step by step; `take()` -> the global counts since the
  last take (the logging window)."""

  def __init__(self, loss_cfg):
    self.loss_cfg, self.window = loss_cfg, TokenCounts()

  def add(self, local_batch: dict) -> None:
    self.window = self.window + count(local_batch, self.loss_cfg)

  def take(self) -> TokenCounts:
    window, self.window = self.window, TokenCounts()
    return global_counts(window)
