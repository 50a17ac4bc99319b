"""Symmetric InfoNCE over the global batch: the one implementation, with its options.

Anchors a (side x and y, after the optional projector and predictor) score candidates c (the
target side: the same embeddings, or those of an EMA target encoder). Per anchor x_i, with
s = cosine similarity:
  pool      = {c(y_j)}                 + {c(x_j), if same_language}
  logit     = (s - m * [candidate is the positive y_i]) / tau          (additive margin m)
  excluded  : c(x_i) itself if mask_self; any candidate whose text equals y_i's
              (mask_duplicates, needs batch["text_hash"]), except the positive
  L_x->y    = mean_i [ logsumexp(logits over the pool) - logit(positive) ]
L_y->x swaps the sides; `symmetric` picks mean = (L_x->y + L_y->x)/2, sum, x2y or y2x.

Sharding: the loss runs under `jax.shard_map` over the batch mesh axes. Each device
all-gathers the candidates (`lax.all_gather(tiled=True)`, whose transpose is a
reduce-scatter, so the gradient reaches every negative) and scores its b local anchors
against them: b x B logits per device (b x 2B with same_language), never B x B. The label of
local row r on shard k is k*b + r. `negatives` picks the pool: global (all B rows, gradient
through the gather), local (the device's own b rows) or global_stopgrad (all B rows,
gradient only through the device's own b).

Chunked form (`chunk` > 0, loss.contrastive_chunk): the same gather, but the candidates are
scored `chunk` columns at a time with an online log-sum-exp (running max and sum), and a
custom VJP recomputes each chunk's softmax in the backward instead of storing it: b x chunk
logits per device, O(b * chunk + B * D) memory. It covers the plain loss, every
`negatives`/`symmetric` choice, heads and EMA targets; margin, same-language negatives and
duplicate masking change the pool entry by entry and are refused with it (config/validate.py).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from bepa_jax.config.validate import check_chunk, check_static_temperature
from bepa_jax.mesh import BATCH_AXES

METRICS = ("contrastive_loss", "acc_x2y", "acc_y2x", "pos_cos", "neg_cos")


@dataclasses.dataclass(frozen=True)
class Options:
  margin: float = 0.0
  symmetric: str = "mean"
  negatives: str = "global"
  same_language: bool = False
  mask_self: bool = True
  mask_duplicates: bool = False
  chunk: int = 0                     # 0: b x B logits; > 0: streaming, b x chunk logits

  @classmethod
  def from_config(cls, loss_cfg) -> "Options":
    return cls(margin=float(loss_cfg.margin), symmetric=str(loss_cfg.symmetric),
               negatives=str(loss_cfg.negatives),
               same_language=bool(loss_cfg.same_language_negatives),
               mask_self=bool(loss_cfg.mask_self), mask_duplicates=bool(loss_cfg.mask_duplicates),
               chunk=int(loss_cfg.contrastive_chunk))



def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


# --- the streaming log-sum-exp of the chunked form -------------------------------------------

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
  (m, s), _ = lax.scan(body, (zero - jnp.inf, zero), _chunks(c, chunk))
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


# --- one direction (x -> y or y -> x) --------------------------------------------------------

def _direction(anchors, pos_pool, same_pool, labels, tau, opts, pos_hash, pool_hash, same_hash):
  """Sums over local anchors: (cross-entropy, top-1 hits, positive cos, negative cos, #neg)."""
  if opts.chunk:
    return _streaming_direction(anchors, pos_pool, labels, tau, opts.chunk)
  n = pos_pool.shape[0]
  sims = anchors @ pos_pool.T                                   # [b, n]
  is_pos = jnp.arange(n)[None, :] == labels[:, None]
  invalid = jnp.zeros_like(is_pos)
  if pos_hash is not None:
    invalid = (pool_hash[None, :] == pos_hash[:, None]) & ~is_pos
  neg = ~is_pos & ~invalid
  neg_sum, neg_count = jnp.sum(jnp.where(neg, sims, 0.0)), jnp.sum(neg.astype(jnp.float32))
  pos_sim = jnp.sum(jnp.where(is_pos, sims, 0.0), axis=1)
  if same_pool is not None:                                     # same-language candidates
    sims2 = anchors @ same_pool.T
    invalid2 = jnp.zeros_like(is_pos)
    if opts.mask_self:
      invalid2 = is_pos                                         # the anchor's own sentence
    if pos_hash is not None:
      invalid2 = invalid2 | (same_hash[None, :] == pos_hash[:, None])
    sims = jnp.concatenate([sims, sims2], axis=1)
    is_pos = jnp.concatenate([is_pos, jnp.zeros_like(is_pos)], axis=1)
    invalid = jnp.concatenate([invalid, invalid2], axis=1)
  logits = (sims - opts.margin * is_pos) / tau if opts.margin else sims / tau
  logits = jnp.where(invalid, -jnp.inf, logits)
  pos_logit = jnp.sum(jnp.where(is_pos, logits, 0.0), axis=1)
  ce = jax.nn.logsumexp(logits, axis=1) - pos_logit
  hits = jnp.argmax(jnp.where(invalid, -jnp.inf, sims), axis=1) == labels
  return ce.sum(), hits.astype(jnp.float32).sum(), pos_sim.sum(), neg_sum, neg_count


def _streaming_direction(anchors, pool, labels, tau, chunk):
  """`_direction` without the [b, n] logits (no margin, same-language pool or hashes)."""
  b, n = anchors.shape[0], pool.shape[0]
  check_chunk(chunk, n)
  lse, row_max = streaming_lse(anchors, pool, 1.0 / tau, chunk)
  pos_sim = jnp.sum(anchors * pool[labels], axis=-1)
  pos_logit = pos_sim / tau
  # top-1 = the positive is the row max (argmax would need the b x n row). The two are summed
  # in different orders (dot here, matmul there), so compare to rounding, not bitwise.
  pos = lax.stop_gradient(pos_logit)
  hits = (pos >= row_max - 1e-5 * (1.0 + jnp.abs(row_max))).astype(jnp.float32)
  all_sims = jnp.sum(anchors, axis=0) @ jnp.sum(pool, axis=0)  # sum of a_i . c_j, all i, j
  return ((lse - pos_logit).sum(), hits.sum(), pos_sim.sum(), all_sims - pos_sim.sum(),
          jnp.float32(b * (n - 1)))


# --- both directions, the metrics ------------------------------------------------------------

def _gather(c, axis, offset, negatives):
  if axis is None or negatives == "local":
    return c
  if negatives == "global_stopgrad":  # other shards' columns are constants; ours keep their grad
    full = lax.all_gather(lax.stop_gradient(c), axis, tiled=True)
    return lax.dynamic_update_slice_in_dim(full, c, offset, axis=0)
  return lax.all_gather(c, axis, tiled=True)


def _stats(ax, ay, cx, cy, hx, hy, tau, *, opts, axis, global_batch):
  b = ax.shape[0]
  local = axis is None or opts.negatives == "local"
  offset = 0 if local else lax.axis_index(axis) * b
  labels = offset + jnp.arange(b)
  cx_all, cy_all = (_gather(c, axis, offset, opts.negatives) for c in (cx, cy))
  if hx is not None and not local:
    hx_all, hy_all = lax.all_gather(hx, axis, tiled=True), lax.all_gather(hy, axis, tiled=True)
  else:
    hx_all, hy_all = hx, hy
  same = opts.same_language
  xy = _direction(ax, cy_all, cx_all if same else None, labels, tau, opts, hy, hy_all, hx_all)
  yx = _direction(ay, cx_all, cy_all if same else None, labels, tau, opts, hx, hx_all, hy_all)
  s = jnp.stack([xy[0], yx[0], xy[1], yx[1], xy[2], xy[3], xy[4]])
  if axis is not None:
    s = lax.psum(s, axis)
  B = global_batch
  loss_xy, loss_yx = s[0] / B, s[1] / B
  loss = {"mean": 0.5 * (loss_xy + loss_yx), "sum": loss_xy + loss_yx, "x2y": loss_xy,
          "y2x": loss_yx}[opts.symmetric]
  return {"contrastive_loss": loss, "acc_x2y": s[2] / B, "acc_y2x": s[3] / B,
          "pos_cos": s[4] / B, "neg_cos": s[5] / jnp.maximum(s[6], 1.0)}


def _prepare(ax, ay, cx, cy):
  ax, ay = l2_normalize(ax), l2_normalize(ay)
  cx = ax if cx is None else l2_normalize(cx)
  cy = ay if cy is None else l2_normalize(cy)
  return ax, ay, cx, cy


def _static_tau(temperature, opts):
  check_static_temperature(opts.chunk, not isinstance(temperature, (int, float)))


def infonce_reference(ax, ay, temperature, opts: Options = Options(), cx=None, cy=None,
                      text_hash=None):
  """Unsharded form (one pool of B rows, B x B logits unless chunked). For tests and tiny B."""
  _static_tau(temperature, opts)
  ax, ay, cx, cy = _prepare(ax, ay, cx, cy)
  hx, hy = (None, None) if text_hash is None else (text_hash[:, 0], text_hash[:, 1])
  return _stats(ax, ay, cx, cy, hx, hy, temperature, opts=opts, axis=None,
                global_batch=ax.shape[0])


def sharded_infonce(ax, ay, temperature, mesh, opts: Options = Options(), cx=None, cy=None,
                    text_hash=None, batch_axes=BATCH_AXES):
  """The loss and metrics (METRICS, scalars) over the global batch; b x B logits per device.

  ax, ay: [B, D] anchors of side x and y, sharded along `batch_axes` on dim 0; cx, cy: [B, D]
  candidates (default: the anchors); text_hash: optional [B, 2] int ids of each side's text
  (read only if opts.mask_duplicates); temperature: a float, or a traced scalar (learned; not
  with opts.chunk). None of the inputs need be normalised.
  """
  _static_tau(temperature, opts)
  axes = tuple(a for a in batch_axes if mesh.shape[a] > 1) or batch_axes[:1]
  spec = P(axes, None)
  sharding = NamedSharding(mesh, spec)  # shard_map inputs must already carry it
  ax, ay, cx, cy = (lax.with_sharding_constraint(z, sharding) for z in _prepare(ax, ay, cx, cy))
  args, specs = [ax, ay, cx, cy], [spec] * 4
  use_hash = opts.mask_duplicates and text_hash is not None
  if use_hash:
    th = lax.with_sharding_constraint(text_hash.astype(jnp.int32), sharding)
    args += [th[:, 0], th[:, 1]]
    specs += [P(axes), P(axes)]
  static = opts.chunk > 0  # the streaming VJP takes 1/tau as a Python float
  tau = float(temperature) if static else jnp.asarray(temperature, jnp.float32)

  def body(*a):
    hx, hy = (a[4], a[5]) if use_hash else (None, None)
    t = tau if static else a[-1]
    return _stats(*a[:4], hx, hy, t, opts=opts, axis=axes, global_batch=ax.shape[0])

  in_specs = tuple(specs) + (() if static else (P(),))
  args = args + ([] if static else [tau])
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs,
                       out_specs={k: P() for k in METRICS})(*args)
