"""GradCache (Gao et al. 2021): the full global batch as negative pool, one chunk of activations.

The contrastive loss couples every row of the batch only through the [CLS] embeddings,
which are small ([B, 2, H]). So:
  1. embed the batch in k chunks without keeping activations (`lax.map`, no autodiff);
  2. take the loss and its gradient with respect to those embeddings over the whole batch
     (and with respect to the head parameters: projector, predictor, temperature);
  3. re-run each chunk forward under `jax.vjp` and pull back the cached embedding gradient
     (plus that chunk's share of the MLM loss), summing parameter gradients.
The result equals the full-batch gradient (same pool, same loss); the price is a second
forward per chunk. Peak memory holds one chunk's activations instead of the batch's.
With dropout on, each chunk uses the same dropout key in both passes, so step 3 recomputes
exactly the embeddings that step 2 differentiated.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from bepa_jax import mesh as mesh_lib


@runtime_checkable
class SplitLoss(Protocol):
  """What GradCache needs of a loss: its parts, so the coupling term can be cached.
  `objective.loss.Objective` is the implementation (loss_fn = combine(encode, contrastive))."""
  weight: float

  def encode(self, params, batch, rng, with_mlm: bool = True):
    """-> ([CLS] [B, 2, H], (MLM ce sum, correct, count) or None)."""

  def target(self, ema_params, batch):
    """-> the EMA target's candidates [B, 2, D] (no gradient)."""

  def contrastive(self, params, cls, target, batch) -> dict:
    """-> metrics with "contrastive_loss", from [CLS] of the whole batch."""

  def combine(self, ce, correct, count, con, mlm_norm=None):
    """-> (loss, metrics) from the MLM sums and the contrastive metrics."""


def split(tree, k: int, mesh):
  """[B, ...] -> [k, B/k, ...]; every chunk keeps rows on the devices that hold them."""
  def f(a):
    a = jnp.moveaxis(a.reshape((a.shape[0] // k, k) + a.shape[1:]), 1, 0)
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES)))
  return jax.tree.map(f, tree)


def merge(tree, mesh):
  """Inverse of `split`: [k, B/k, ...] -> [B, ...] in the original row order."""
  def f(a):
    a = jnp.moveaxis(a, 0, 1)
    a = a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(mesh_lib.BATCH_AXES)))
  return jax.tree.map(f, tree)


def value_and_grad(obj: SplitLoss, params, batch, rng, k: int, mesh, ema_params=None):
  """((loss, metrics), grads) of `obj.loss_fn` on the whole batch, computed in k chunks.

  obj: a SplitLoss (objective.loss.Objective). Chunk i uses dropout key fold_in(rng, i) in both passes.
  """
  chunks = split(batch, k, mesh)
  idx = jnp.arange(k)

  # 1. Embeddings of every chunk; nothing here is differentiated, so nothing is kept.
  def embed(xs):
    i, c = xs
    cls, _ = obj.encode(jax.lax.stop_gradient(params), c, jax.random.fold_in(rng, i),
                        with_mlm=False)
    tgt = obj.target(ema_params, c) if ema_params is not None else jnp.zeros((), jnp.float32)
    return cls, tgt
  cls_k, tgt_k = jax.lax.map(embed, (idx, chunks))
  cls = merge(cls_k, mesh)
  target = merge(tgt_k, mesh) if ema_params is not None else None

  # 2. The contrastive loss over the full pool and its gradient w.r.t. the embeddings.
  def con_fn(p, z):
    con = obj.contrastive(p, z, target, batch)
    return obj.weight * con["contrastive_loss"], con
  (_, con), (g_head, g_cls) = jax.value_and_grad(con_fn, argnums=(0, 1), has_aux=True)(params, cls)
  count = jnp.maximum(jnp.sum(batch["mlm_weights"]), 1.0)

  # 3. Each chunk again, forward and backward, driven by the cached embedding gradient.
  #    The chunk's MLM ce sum enters the loss as ce / count: its cotangent is 1 / count.
  def body(acc, xs):
    i, c, g = xs
    def f(p):
      z, (ce, correct, _) = obj.encode(p, c, jax.random.fold_in(rng, i))
      return (z, ce), correct
    (_, ce), vjp, correct = jax.vjp(f, params, has_aux=True)
    grads, = vjp((g, (1.0 / count).astype(ce.dtype)))
    g_acc, ce_acc, correct_acc = acc
    return (jax.tree.map(jnp.add, g_acc, grads), ce_acc + ce, correct_acc + correct), None

  zero = jnp.zeros((), jnp.float32)
  (grads, ce, correct), _ = jax.lax.scan(body, (g_head, zero, zero),
                                         (idx, chunks, split(g_cls, k, mesh)))
  loss, metrics = obj.combine(ce, correct, count, con)
  return (loss, metrics), grads
