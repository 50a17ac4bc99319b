"""InfoNCE variants for negative-pool studies, sharded like objective.sharded_infonce.

Anchors a (context side, after the optional projector and predictor) score candidates c
(the target side: the same embeddings, or those of an EMA target encoder). Per anchor
x_i, with s = cosine similarity:
  pool      = {c(y_j)}                 + {c(x_j), if same_language}
  logit     = (s - m * [candidate is the positive y_i]) / tau          (additive margin m)
  excluded  : c(x_i) itself if mask_self; any candidate whose text equals y_i's
              (mask_duplicates, needs batch["text_hash"]), except the positive
  L_x->y    = mean_i [ logsumexp(logits over the pool) - logit(positive) ]
L_y->x swaps the sides; symmetric picks mean = (L_x->y + L_y->x)/2, sum, x2y or y2x.
The pool of each device is: global (all B rows, gradient through all_gather), local
(its own b rows only) or global_stopgrad (all B rows, gradient only through its own b).
Every device holds b x B (b x 2B with same-language) logits, never B x B.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from bepa_jax.objective.plain import BATCH_AXES, l2_normalize

SYMMETRIC = ("mean", "sum", "x2y", "y2x")
NEGATIVES = ("global", "local", "global_stopgrad")
METRICS = ("contrastive_loss", "acc_x2y", "acc_y2x", "pos_cos", "neg_cos")


@dataclasses.dataclass(frozen=True)
class Options:
  margin: float = 0.0
  symmetric: str = "mean"
  negatives: str = "global"
  same_language: bool = False
  mask_self: bool = True
  mask_duplicates: bool = False

  @classmethod
  def from_config(cls, loss_cfg) -> "Options":
    get = loss_cfg.get
    return cls(margin=float(get("margin", 0.0)), symmetric=str(get("symmetric", "mean")),
               negatives=str(get("negatives", "global")),
               same_language=bool(get("same_language_negatives", False)),
               mask_self=bool(get("mask_self", True)),
               mask_duplicates=bool(get("mask_duplicates", False)))

  @property
  def is_default(self) -> bool:
    return self == Options()


def _gather(c, axis, offset, negatives):
  if axis is None or negatives == "local":
    return c
  if negatives == "global_stopgrad":  # other shards' columns are constants; ours keep their grad
    full = lax.all_gather(lax.stop_gradient(c), axis, tiled=True)
    return lax.dynamic_update_slice_in_dim(full, c, offset, axis=0)
  return lax.all_gather(c, axis, tiled=True)


def _direction(anchors, pos_pool, same_pool, labels, tau, opts, pos_hash, pool_hash, same_hash):
  """Sums over local anchors: (cross-entropy, top-1 hits, positive cos, negative cos, #neg)."""
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


def contrastive_reference(ax, ay, temperature, opts: Options, cx=None, cy=None, text_hash=None):
  """Unsharded form (one pool of B rows). For tests and tiny batches."""
  ax, ay, cx, cy = _prepare(ax, ay, cx, cy)
  hx, hy = (None, None) if text_hash is None else (text_hash[:, 0], text_hash[:, 1])
  return _stats(ax, ay, cx, cy, hx, hy, temperature, opts=opts, axis=None,
                global_batch=ax.shape[0])


def sharded_contrastive(ax, ay, temperature, mesh, opts: Options, cx=None, cy=None,
                        text_hash=None, batch_axes=BATCH_AXES):
  """The loss and metrics above; b x B logits per device.

  ax, ay: [B, D] anchors of side x and y; cx, cy: [B, D] candidates (default: the anchors);
  text_hash: optional [B, 2] int ids of each side's text (only read if opts.mask_duplicates);
  temperature: a float or a traced scalar (learned). None of the inputs need be normalised.
  """
  axes = tuple(a for a in batch_axes if mesh.shape[a] > 1) or batch_axes[:1]
  spec = P(axes, None)
  sharding = NamedSharding(mesh, spec)
  ax, ay, cx, cy = (lax.with_sharding_constraint(z, sharding) for z in _prepare(ax, ay, cx, cy))
  args, specs = [ax, ay, cx, cy], [spec] * 4
  use_hash = opts.mask_duplicates and text_hash is not None
  if use_hash:
    th = lax.with_sharding_constraint(text_hash.astype(jnp.int32), sharding)
    args += [th[:, 0], th[:, 1]]
    specs += [P(axes), P(axes)]
  tau = jnp.asarray(temperature, jnp.float32)

  def body(*a):
    hx, hy = (a[4], a[5]) if use_hash else (None, None)
    return _stats(*a[:4], hx, hy, a[-1], opts=opts, axis=axes, global_batch=ax.shape[0])

  return jax.shard_map(body, mesh=mesh, in_specs=tuple(specs) + (P(),),
                       out_specs={k: P() for k in METRICS})(*args, tau)
