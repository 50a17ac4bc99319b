"""Symmetric InfoNCE over the global batch with a streaming log-sum-exp: b x chunk logits.

`objective.sharded_infonce` holds b x B logits per device (and their softmax for the
backward): at B = 65,536 pairs on 8 devices that is 8,192 x 65,536 x 4 B = 2 GiB per buffer.
Here each device still all-gathers the B candidates ([B, D], the same all_gather and
reduce-scatter), but scores them `chunk` columns at a time with an online log-sum-exp
(running max and sum), and a custom VJP recomputes each chunk's softmax in the backward
instead of storing it. Memory per device: O(b * chunk + B * D). Same loss and gradient as
the plain form up to float rounding (tests/test_chunked.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from bepa_jax.errors import ConfigError
from bepa_jax.objective.plain import BATCH_AXES, l2_normalize

METRICS = ("contrastive_loss", "acc_x2y", "acc_y2x", "pos_cos", "neg_cos")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def streaming_lse(a, c, inv_tau: float, chunk: int):
  """(logsumexp_j a_i.c_j * inv_tau, max_j of the same) over the rows of c, chunk at a time."""
  return _lse_fwd(a, c, inv_tau, chunk)[0]


def _chunks(c, chunk):
  return c.reshape(c.shape[0] // chunk, chunk, c.shape[1])


def _lse_fwd(a, c, inv_tau, chunk):
  def body(carry, cj):
    m, s = carry
    logits = (a @ cj.T) * inv_tau                       # [b, chunk]: the only logits alive
    m_new = jnp.maximum(m, logits.max(axis=1))
    s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(axis=1)
    return (m_new, s), None
  zero = a[:, 0] * 0  # carries a's type, including shard_map's varying-over-axes
  init = (zero - jnp.inf, zero)
  (m, s), _ = lax.scan(body, init, _chunks(c, chunk))
  lse = m + jnp.log(s)
  return (lse, m), (a, c, lse)


def _lse_bwd(inv_tau, chunk, res, cotangents):
  a, c, lse = res
  g = cotangents[0]                                      # the max is a metric: no gradient
  def body(da, cj):
    p = jnp.exp((a @ cj.T) * inv_tau - lse[:, None]) * g[:, None]   # softmax chunk, recomputed
    return da + (p @ cj) * inv_tau, (p.T @ a) * inv_tau
  da, dc = lax.scan(body, a * 0, _chunks(c, chunk))
  return da, dc.reshape(c.shape)


streaming_lse.defvjp(_lse_fwd, _lse_bwd)


def _direction(anchors, candidates, labels, temperature, chunk):
  """Cross-entropy sum, top-1 hits, positive and negative cosine sums (as objective._direction)."""
  lse, row_max = streaming_lse(anchors, candidates, 1.0 / temperature, chunk)
  pos_sim = jnp.sum(anchors * candidates[labels], axis=-1)
  pos_logit = pos_sim / temperature
  ce = lse - pos_logit
  # top-1 = the positive is the row max (argmax would need the b x B row). The two are summed in
  # different orders (dot here, matmul there), so compare to rounding, not bitwise.
  pos = lax.stop_gradient(pos_logit)
  hits = (pos >= row_max - 1e-5 * (1.0 + jnp.abs(row_max))).astype(jnp.float32)
  all_sims = jnp.sum(anchors, axis=0) @ jnp.sum(candidates, axis=0)  # sum of a_i . c_j, all i, j
  return ce.sum(), hits.sum(), pos_sim.sum(), all_sims - pos_sim.sum()


def _stats(zx, zy, *, temperature, chunk, axis, global_batch):
  b = zx.shape[0]
  zx_all = lax.all_gather(zx, axis, tiled=True)
  zy_all = lax.all_gather(zy, axis, tiled=True)
  labels = lax.axis_index(axis) * b + jnp.arange(b)
  ce_xy, hit_xy, pos, neg = _direction(zx, zy_all, labels, temperature, chunk)
  ce_yx, hit_yx, _, _ = _direction(zy, zx_all, labels, temperature, chunk)
  stats = lax.psum(jnp.stack([ce_xy, ce_yx, hit_xy, hit_yx, pos, neg]), axis)
  B = global_batch
  return {"contrastive_loss": 0.5 * (stats[0] + stats[1]) / B, "acc_x2y": stats[2] / B,
          "acc_y2x": stats[3] / B, "pos_cos": stats[4] / B,
          "neg_cos": stats[5] / float(max(B * (B - 1), 1))}


def chunked_infonce(zx, zy, temperature: float, mesh, chunk: int, batch_axes=BATCH_AXES):
  """`objective.sharded_infonce` with b x chunk logits per device; chunk must divide B."""
  B = zx.shape[0]
  if chunk <= 0 or B % chunk:
    raise ConfigError(f"loss.contrastive_chunk={chunk} must be a positive divisor of the "
                      f"(micro-)batch of {B} pairs")
  axes = tuple(a for a in batch_axes if mesh.shape[a] > 1) or batch_axes[:1]
  spec = P(axes, None)
  sharding = NamedSharding(mesh, spec)
  zx = lax.with_sharding_constraint(l2_normalize(zx), sharding)
  zy = lax.with_sharding_constraint(l2_normalize(zy), sharding)
  body = functools.partial(_stats, temperature=float(temperature), chunk=int(chunk), axis=axes,
                           global_batch=B)
  return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec),
                       out_specs={k: P() for k in METRICS})(zx, zy)
