"""The MLM term: cross-entropy at the masked positions, as sums the step divides once."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def mlm_loss(logits, labels, weights):
  """Sums over masked positions: (cross-entropy sum, correct count, number of positions)."""
  # Written for XLA on CPU/TPU: the label logit is a one-hot select, not a gather (whose
  # gradient is a scatter into [N, V]), and a hit is "the label logit is the max", not an
  # argmax (a variadic reduce over V). Same values; the step is ~10% faster (bench/step.py).
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  onehot = labels[..., None].astype(jnp.int32) == lax.broadcasted_iota(jnp.int32, logits.shape,
                                                                       logits.ndim - 1)
  label_logit = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  ce = (logz - label_logit) * weights
  hit = label_logit >= lax.stop_gradient(jnp.max(logits, axis=-1))
  correct = hit.astype(jnp.float32) * weights
  return ce.sum(), correct.sum(), weights.sum()
