"""BERT's MLM masking on the host: 15% of real tokens, 80% [MASK] / 10% random / 10% kept."""
from __future__ import annotations

import numpy as np


def mask_sequence(ids: np.ndarray, n_real: int, rng: np.random.Generator, *, mask_prob: float,
                  max_predictions: int, mask_id: int, vocab_size: int,
                  random_token_low: int):
  """Masks one sequence laid out as [CLS] t_1..t_n [SEP] [PAD]...; never picks specials.

  Returns (masked ids, positions [P], labels [P], weights [P]); P = max_predictions.
  `n_real` is the number of content tokens n (between [CLS] and [SEP]).
  """
  ids = ids.copy()
  positions = np.zeros(max_predictions, np.int32)
  labels = np.zeros(max_predictions, np.int32)
  weights = np.zeros(max_predictions, np.float32)
  if n_real <= 0:
    return ids, positions, labels, weights
  k = min(max_predictions, max(1, int(round(n_real * mask_prob))))
  chosen = np.sort(rng.choice(n_real, size=k, replace=False) + 1)  # +1 skips [CLS]
  labels[:k] = ids[chosen]
  positions[:k] = chosen
  weights[:k] = 1.0
  action = rng.random(k)
  replace_mask = action < 0.8
  replace_rand = (action >= 0.8) & (action < 0.9)
  ids[chosen[replace_mask]] = mask_id
  n_rand = int(replace_rand.sum())
  if n_rand:
    ids[chosen[replace_rand]] = rng.integers(random_token_low, vocab_size, size=n_rand)
  return ids, positions, labels, weights
