"""BERT's MLM masking on the host: 15% of real tokens, 80% [MASK] / 10% random / 10% kept."""
from __future__ import annotations

import numpy as np


def mask_batch(seq: np.ndarray, n: np.ndarray, u: np.ndarray, *, mask_prob: float,
               max_predictions: int, mask_id: int, vocab_size: int, random_token_low: int,
               maskable: np.ndarray | None = None):
  """BERT masking of [N, L] sequences [CLS] t_1..t_n [SEP] [PAD]..., vectorised.

  k = clip(round(n * mask_prob), 1, P) content tokens,
  80% -> [MASK], 10% -> a random non-special token, 10% kept; never a special position.
  `u` [N, >= L + 2P] uniforms: L position keys, P actions, P random-token draws.
  `maskable` [N, L] (optional): the content positions when they are not 1..n, e.g. both
  halves of a pair sequence [CLS] x [SEP] [CLS] y [SEP]; then n is their count per row.
  Returns (masked [N, L], positions [N, P], labels [N, P], weights [N, P]).
  """
  N, L = seq.shape
  P = max_predictions
  k = np.where(n > 0, np.clip(np.round(n * mask_prob), 1, P), 0).astype(np.int64)
  idx = np.arange(L)[None]
  if maskable is None:
    maskable = (idx >= 1) & (idx <= n[:, None])
  keys = np.where(maskable, u[:, :L], 2.0)   # only content tokens
  chosen = np.argsort(keys, axis=1, kind="stable")[:, :P]
  take = np.arange(P)[None] < k[:, None]
  positions = np.sort(np.where(take, chosen, L), axis=1)            # ascending, unused last
  take = positions < L
  positions = np.where(take, positions, 0).astype(np.int32)
  rows = np.arange(N)[:, None]
  labels = np.where(take, seq[rows, positions], 0).astype(np.int32)
  act, rnd = u[:, L:L + P], u[:, L + P:L + 2 * P]
  rand_tok = np.minimum(random_token_low + (rnd * (vocab_size - random_token_low)).astype(
      np.int64), vocab_size - 1)
  new = np.where(act < 0.8, mask_id, np.where(act < 0.9, rand_tok, labels))
  masked = seq.copy()
  r, c = np.nonzero(take)
  masked[r, positions[r, c]] = new[r, c]
  return masked, positions, labels, take.astype(np.float32)
