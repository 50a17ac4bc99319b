"""The train step: one jitted function with explicit shardings and a donated state.

The batch is laid out as data/batch_spec.py describes (padded [B, 2, L], packed [G, R, L] with
segment ids, TLM pair sequences). Both sides go through the encoder as one [2B, L] batch: the
reshape keeps every device's rows local, so no data moves; each sentence is still encoded on
its own.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bepa_jax.objective import gradcache
from bepa_jax.objective import heads
from bepa_jax import mesh as mesh_lib
from bepa_jax.objective.loss import Objective

BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "mlm_positions", "mlm_ids",
              "mlm_weights")


def accumulate(grad_fn, params, batch, rng, k: int, mesh, ema_params=None):
  """Mean loss, metrics and gradient over k micro-batches, each its own negative pool.

  This bounds memory, not the pool: the contrastive term is the mean of k InfoNCE losses
  over B/k rows each. For a pool of the full B, use GradCache (train.gradcache_chunks).
  The MLM term is the plain step's: CE sum over the whole batch's masked positions / their
  global count (micro-batches' counts differ). So each micro-batch divides its CE sum by
  count / k, and the mean over the k micro-batches is sum(ce_i) / count.
  `grad_fn(params, batch, rng, ema_params, mlm_norm)`, e.g. value_and_grad(Objective.loss_fn).
  """
  micro = gradcache.split(batch, k, mesh)  # every micro-batch spread over all shards
  norm = jnp.maximum(jnp.sum(batch["mlm_weights"]), 1.0) / k
  def body(acc, xs):
    i, mb = xs
    (_, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i), ema_params, norm)
    return jax.tree.map(jnp.add, acc, (g, m)), None
  zeros = jax.tree.map(jnp.zeros_like, params)
  m0 = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda a: a[0], micro), rng,
                                      ema_params, norm)[0][1])
  m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
  (grads, metrics), _ = jax.lax.scan(body, (zeros, m0), (jnp.arange(k), micro))
  grads = jax.tree.map(lambda g: g / k, grads)
  metrics = jax.tree.map(lambda m: m / k, metrics)
  return (metrics["loss"], metrics), grads


def make_train_step(model, config, mesh, state_shardings, schedule=None):
  """Returns jitted `step(state, batch) -> (state, metrics)`; `state` is donated."""
  head = heads.from_config(config.loss, model.cfg.hidden_size)
  obj = Objective(model, config.loss, mesh, head)
  grad_fn = jax.value_and_grad(obj.loss_fn, has_aux=True)
  k = int(config.train.grad_accum_steps)
  chunks = int(config.train.gradcache_chunks)
  ema_decay = float(config.loss.ema_decay)
  seed = int(config.train.seed)
  rng_impl = str(config.train.dropout_rng)
  rules = mesh_lib.rules(config.mesh)

  def step(state, batch):
    with nn.logical_axis_rules(rules):
      # Dropout randomness is a pure function of (seed, step): resume is exact.
      rng = jax.random.fold_in(jax.random.key(seed, impl=rng_impl), state.step)
      ema = state.ema_params
      if chunks > 1:  # the pool is the full batch; memory is one chunk's activations
        (_, metrics), grads = gradcache.value_and_grad(obj, state.params, batch, rng, chunks,
                                                       mesh, ema)
      elif k == 1:
        (_, metrics), grads = grad_fn(state.params, batch, rng, ema)
      else:  # each micro-batch is its own negative pool (see docs: accumulation != bigger pool)
        (_, metrics), grads = accumulate(grad_fn, state.params, batch, rng, k, mesh, ema)
      metrics["grad_norm"] = optax.tree.norm(grads)
      if schedule is not None:
        metrics["learning_rate"] = schedule(state.step)
      new_state = state.apply_gradients(grads)
      if ema_decay > 0.0:
        new_state = new_state.replace(
            ema_params=heads.ema_update(state.ema_params, new_state.params, ema_decay))
      return new_state, metrics

  # One sharding for every batch key (a pytree prefix), so optional keys such as
  # text_hash need no change here.
  return jax.jit(step, in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
