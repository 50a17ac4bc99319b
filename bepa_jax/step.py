"""The train step: one jitted function with explicit shardings and a donated state.

Batch layout (numpy on the host, global arrays on device), B = sentence pairs:
  input_ids, token_type_ids, attention_mask : [B, 2, L]   side 0 = x, side 1 = y
  mlm_positions, mlm_ids                    : [B, 2, P]   P = max_predictions_per_seq
  mlm_weights                               : [B, 2, P]   1.0 where a prediction is real
Both sides go through the encoder as one [2B, L] batch: the reshape keeps every
device's rows local, so no data moves. Each sentence is still encoded on its own.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bepa_jax import mesh as mesh_lib
from bepa_jax import objective

BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "mlm_positions", "mlm_ids",
              "mlm_weights")


def make_loss_fn(model, loss_cfg, mesh):
  weight = float(loss_cfg.weight)
  temperature = float(loss_cfg.temperature)

  def loss_fn(params, batch, rng):
    B = batch["input_ids"].shape[0]
    flat = lambda a: a.reshape((2 * B,) + a.shape[2:])
    out = model.apply({"params": params}, flat(batch["input_ids"]), flat(batch["token_type_ids"]),
                      flat(batch["attention_mask"]), flat(batch["mlm_positions"]),
                      deterministic=False, rngs={"dropout": rng})
    ce, correct, count = objective.mlm_loss(out["mlm_logits"], flat(batch["mlm_ids"]),
                                            flat(batch["mlm_weights"]))
    count = jnp.maximum(count, 1.0)
    mlm = ce / count
    cls = out["cls"].reshape(B, 2, -1)
    zx, zy = cls[:, 0], cls[:, 1]
    if weight == 0.0:  # pure MLM; the contrastive numbers are still logged
      zx, zy = jax.lax.stop_gradient(zx), jax.lax.stop_gradient(zy)
    con = objective.sharded_infonce(zx, zy, temperature, mesh)
    loss = mlm + weight * con["contrastive_loss"] if weight else mlm
    metrics = {"loss": loss, "mlm_loss": mlm, "mlm_accuracy": correct / count, **con}
    return loss, metrics

  return loss_fn


def _microbatches(batch, k: int, mesh):
  """[B, ...] -> [k, B/k, ...] so that every micro-batch is spread over all batch shards."""
  def split(a):
    a = a.reshape((a.shape[0] // k, k) + a.shape[1:])
    a = jnp.moveaxis(a, 1, 0)
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES)))
  return jax.tree.map(split, batch)


def make_train_step(model, config, mesh, state_shardings, schedule=None):
  """Returns jitted `step(state, batch) -> (state, metrics)`; `state` is donated."""
  loss_fn = make_loss_fn(model, config.loss, mesh)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  k = int(config.train.grad_accum_steps)
  seed = int(config.train.seed)
  rules = mesh_lib.rules(config.mesh)

  def step(state, batch):
    with nn.logical_axis_rules(rules):
      # Dropout randomness is a pure function of (seed, step): resume is exact.
      rng = jax.random.fold_in(jax.random.key(seed), state.step)
      if k == 1:
        (_, metrics), grads = grad_fn(state.params, batch, rng)
      else:  # each micro-batch is its own negative pool (see docs: accumulation != bigger pool)
        micro = _microbatches(batch, k, mesh)
        def body(acc, xs):
          i, mb = xs
          (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
          return jax.tree.map(jnp.add, acc, (g, m)), None
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        m0 = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda a: a[0], micro),
                                            rng)[0][1])
        m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
        (grads, metrics), _ = jax.lax.scan(body, (zeros, m0), (jnp.arange(k), micro))
        grads = jax.tree.map(lambda g: g / k, grads)
        metrics = jax.tree.map(lambda m: m / k, metrics)
      metrics["grad_norm"] = optax.tree.norm(grads)
      if schedule is not None:
        metrics["learning_rate"] = schedule(state.step)
      return state.apply_gradients(grads), metrics

  batch_sh = {key: mesh_lib.batch_sharding(mesh) for key in BATCH_KEYS}
  return jax.jit(step, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
