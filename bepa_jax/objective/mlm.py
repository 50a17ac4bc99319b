"""The MLM term: cross-entropy at the masked positions, as sums the step divides once.

Two forms with the same values. `mlm_loss` takes the [N, V] logits of the model's MLM head.
`chunked_mlm_loss` (loss.mlm_vocab_chunk > 0) takes the head's transformed hidden states h
[N, H] and the tied decoder (word embeddings E [V, H], bias [V]) and streams over the
vocabulary `chunk` rows of E at a time: an online log-sum-exp (running max and sum) in the
forward, and a custom VJP that recomputes each chunk's softmax in the backward and
accumulates the gradients of h, E and the bias chunk by chunk. No [N, V] buffer exists (an
N x chunk one does): for XLM-R's V = 250,002 the dense form holds several [N, V] fp32 arrays.
V need not be a multiple of `chunk`: the last chunk is shorter.
"""
from __future__ import annotations

import functools

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


def chunked_mlm_loss(h, embedding, bias, labels, weights, chunk: int):
  """`mlm_loss` of the logits h @ embedding.T + bias, never forming them: V streamed in chunks.

  h: [..., H] the MLM head's transformed hidden states (compute dtype); embedding: [V, H], each
  chunk cast to h's dtype as the dense decoder does (its gradient comes back in embedding's own
  dtype: fp32 for an fp32 table); bias: [V]; labels, weights: h's leading shape.
  """
  if chunk < 1:
    raise ValueError(f"chunked_mlm_loss needs a chunk >= 1, got {chunk} (0 is mlm_loss's form)")
  hidden = h.shape[-1]
  h2 = h.reshape(-1, hidden)
  ce, hit = streaming_ce(h2, embedding, bias.astype(jnp.float32),
                         labels.reshape(-1).astype(jnp.int32), int(chunk))
  w = weights.reshape(-1).astype(jnp.float32)
  return (ce * w).sum(), (lax.stop_gradient(hit) * w).sum(), w.sum()


# --- the streaming cross-entropy over vocabulary chunks --------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def streaming_ce(h, embedding, bias, labels, chunk: int):
  """Per row: (logsumexp_v logit_v - logit_label, 1.0 if the label logit is the row max), with
  logit = h @ embedding.T + bias streamed `chunk` vocabulary rows at a time."""
  return _ce_fwd(h, embedding, bias, labels, chunk)[0]


def _spans(vocab: int, chunk: int):
  """(full chunks, tail size): the loop runs over the full ones, the tail once after it."""
  chunk = min(chunk, vocab)
  return vocab // chunk, vocab % chunk, chunk


def _logits(h, embedding, bias, labels, lo, size):
  """The [N, size] logits of vocabulary rows lo..lo+size and the labels' one-hot among them."""
  ej = lax.dynamic_slice_in_dim(embedding, lo, size).astype(h.dtype)
  bj = lax.dynamic_slice_in_dim(bias, lo, size)
  logits = lax.dot_general(h, ej, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32) + bj
  onehot = (labels - lo)[:, None] == lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  return logits, onehot, ej


def _ce_fwd(h, embedding, bias, labels, chunk):
  n_full, tail, chunk = _spans(embedding.shape[0], chunk)

  def update(carry, lo, size):
    m, s, lab = carry
    logits, onehot, _ = _logits(h, embedding, bias, labels, lo, size)  # the only logits alive
    m_new = jnp.maximum(m, logits.max(axis=1))
    s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(axis=1)
    return m_new, s, lab + jnp.sum(jnp.where(onehot, logits, 0.0), axis=1)

  zero = (h[:, 0] * 0).astype(jnp.float32)  # carries h's type (shard_map's varying axes too)
  carry = lax.fori_loop(0, n_full, lambda i, c: update(c, i * chunk, chunk),
                        (zero - jnp.inf, zero, zero))
  if tail:
    carry = update(carry, n_full * chunk, tail)
  m, s, label_logit = carry
  lse = m + jnp.log(s)
  # A hit is "the label logit is the row max", as in mlm_loss: both come from the same logits.
  hit = (label_logit >= m).astype(jnp.float32)
  return (lse - label_logit, hit), (h, embedding, bias, labels, lse)


def _ce_bwd(chunk, res, cotangents):
  h, embedding, bias, labels, lse = res
  g = cotangents[0]                                    # the hit count is a metric: no gradient
  n_full, tail, chunk = _spans(embedding.shape[0], chunk)

  def update(carry, lo, size):
    dh, de, db = carry
    logits, onehot, ej = _logits(h, embedding, bias, labels, lo, size)
    p = (jnp.exp(logits - lse[:, None]) - onehot) * g[:, None]     # softmax - one-hot, recomputed
    dh = dh + lax.dot_general(p.astype(h.dtype), ej, (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    dej = lax.dot_general(p.astype(h.dtype), h, (((0,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
    de = lax.dynamic_update_slice_in_dim(de, dej.astype(de.dtype), lo, axis=0)
    db = lax.dynamic_update_slice_in_dim(db, p.sum(axis=0), lo, axis=0)
    return dh, de, db

  carry = (jnp.zeros(h.shape, jnp.float32), jnp.zeros_like(embedding), jnp.zeros_like(bias))
  carry = lax.fori_loop(0, n_full, lambda i, c: update(c, i * chunk, chunk), carry)
  if tail:
    carry = update(carry, n_full * chunk, tail)
  dh, de, db = carry
  return dh.astype(h.dtype), de, db, None


streaming_ce.defvjp(_ce_fwd, _ce_bwd)
