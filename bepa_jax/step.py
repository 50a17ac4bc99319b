"""The train step: one jitted function with explicit shardings and a donated state.

Batch layout (numpy on the host, global arrays on device), B = sentence pairs:
  input_ids, token_type_ids, attention_mask : [B, 2, L]   side 0 = x, side 1 = y
  mlm_positions, mlm_ids                    : [B, 2, P]   P = max_predictions_per_seq
  mlm_weights                               : [B, 2, P]   1.0 where a prediction is real
  text_hash (optional)                      : [B, 2]      id of each sentence's text
Both sides go through the encoder as one [2B, L] batch: the reshape keeps every
device's rows local, so no data moves. Each sentence is still encoded on its own.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from bepa_jax import chunked
from bepa_jax import contrastive
from bepa_jax import gradcache
from bepa_jax import heads
from bepa_jax import mesh as mesh_lib
from bepa_jax import objective

BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "mlm_positions", "mlm_ids",
              "mlm_weights")


class Objective:
  """The BEPA loss in the pieces GradCache needs: encode -> [CLS] -> contrastive on [CLS].

  With every loss option at its default this is exactly objective.sharded_infonce on the
  encoder's [CLS]; options (contrastive.Options, heads.py) only add to that path.
  """

  def __init__(self, model, loss_cfg, mesh, head=None):
    self.model, self.loss_cfg, self.mesh, self.head = model, loss_cfg, mesh, head
    self.weight = float(loss_cfg.weight)
    self.temperature = float(loss_cfg.temperature)
    self.opts = contrastive.Options.from_config(loss_cfg)
    self.plain = head is None and self.opts.is_default and not heads.uses_ema(loss_cfg)

  def encode(self, params, batch, rng, with_mlm: bool = True):
    """-> ([CLS] [B, 2, H], (MLM ce sum, correct, count) or None). Both sides as one [2B] batch."""
    B = batch["input_ids"].shape[0]
    flat = lambda a: a.reshape((2 * B,) + a.shape[2:])
    out = self.model.apply({"params": heads.encoder_params(params)}, flat(batch["input_ids"]),
                           flat(batch["token_type_ids"]), flat(batch["attention_mask"]),
                           flat(batch["mlm_positions"]) if with_mlm else None,
                           deterministic=False, rngs={"dropout": rng})
    mlm = None
    if with_mlm:
      mlm = objective.mlm_loss(out["mlm_logits"], flat(batch["mlm_ids"]),
                               flat(batch["mlm_weights"]))
    return out["cls"].reshape(B, 2, -1), mlm

  def target(self, ema_params, batch):
    """Projected [CLS] [B, 2, D] of the EMA target encoder (no dropout, no gradient)."""
    ema_params = jax.lax.stop_gradient(ema_params)
    B = batch["input_ids"].shape[0]
    flat = lambda a: a.reshape((2 * B,) + a.shape[2:])
    out = self.model.apply({"params": heads.encoder_params(ema_params)}, flat(batch["input_ids"]),
                           flat(batch["token_type_ids"]), flat(batch["attention_mask"]),
                           deterministic=True)
    z = out["cls"]
    if self.head is not None and self.head.projector:
      proj = heads.head_params(ema_params)["proj"]
      z = heads.MLP(self.head.projector).apply({"params": proj}, z)
    return jax.lax.stop_gradient(z.reshape(B, 2, -1))

  def contrastive(self, params, cls, target, batch):
    """Metrics dict (contrastive_loss, accuracies, cosines[, temperature]) from [CLS] [B, 2, H]."""
    zx, zy = cls[:, 0], cls[:, 1]
    if self.weight == 0.0:  # pure MLM; the contrastive numbers are still logged
      zx, zy = jax.lax.stop_gradient(zx), jax.lax.stop_gradient(zy)
    if self.plain:
      chunk = int(self.loss_cfg.get("contrastive_chunk", 0))
      if chunk:  # streaming log-sum-exp: b x chunk logits per device instead of b x B
        return chunked.chunked_infonce(zx, zy, self.temperature, self.mesh, chunk)
      return objective.sharded_infonce(zx, zy, self.temperature, self.mesh)
    hp = heads.head_params(params)
    tau = heads.temperature(self.head, hp, self.loss_cfg)
    cx = cy = None
    if self.head is not None:
      apply = lambda method, z: self.head.apply({"params": hp}, z, method=method)
      zx, zy = (apply(heads.ContrastiveHead.project, z) for z in (zx, zy))
      if self.head.predictor:  # the predictor maps context to target: anchors only
        cx, cy = zx, zy
        zx, zy = (apply(heads.ContrastiveHead.predict, z) for z in (zx, zy))
    if target is not None:
      cx, cy = target[:, 0], target[:, 1]
    con = contrastive.sharded_contrastive(zx, zy, tau, self.mesh, self.opts, cx, cy,
                                          batch.get("text_hash"))
    if not isinstance(tau, float):
      con["temperature"] = tau
    return con

  def combine(self, ce, correct, count, con):
    count = jnp.maximum(count, 1.0)
    mlm = ce / count
    loss = mlm + self.weight * con["contrastive_loss"] if self.weight else mlm
    return loss, {"loss": loss, "mlm_loss": mlm, "mlm_accuracy": correct / count, **con}

  def loss_fn(self, params, batch, rng, ema_params=None):
    cls, (ce, correct, count) = self.encode(params, batch, rng)
    target = None if ema_params is None else self.target(ema_params, batch)
    return self.combine(ce, correct, count, self.contrastive(params, cls, target, batch))


def make_loss_fn(model, loss_cfg, mesh, head=None):
  """`loss_fn(params, batch, rng, ema_params=None) -> (loss, metrics)`."""
  return Objective(model, loss_cfg, mesh, head).loss_fn


def _microbatches(batch, k: int, mesh):
  """[B, ...] -> [k, B/k, ...] so that every micro-batch is spread over all batch shards."""
  def split(a):
    a = a.reshape((a.shape[0] // k, k) + a.shape[1:])
    a = jnp.moveaxis(a, 1, 0)
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES)))
  return jax.tree.map(split, batch)


def accumulate(grad_fn, params, batch, rng, k: int, mesh, ema_params=None):
  """Mean loss, metrics and gradient over k micro-batches, each its own negative pool.

  This bounds memory, not the pool: the contrastive term is the mean of k InfoNCE losses
  over B/k rows each. For a pool of the full B, use GradCache (train.gradcache_chunks).
  """
  micro = _microbatches(batch, k, mesh)
  def body(acc, xs):
    i, mb = xs
    (_, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i), ema_params)
    return jax.tree.map(jnp.add, acc, (g, m)), None
  zeros = jax.tree.map(jnp.zeros_like, params)
  m0 = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda a: a[0], micro), rng,
                                      ema_params)[0][1])
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
  chunks = int(config.train.get("gradcache_chunks", 0))
  ema_decay = float(config.loss.get("ema_decay", 0.0))
  seed = int(config.train.seed)
  rules = mesh_lib.rules(config.mesh)

  def step(state, batch):
    with nn.logical_axis_rules(rules):
      # Dropout randomness is a pure function of (seed, step): resume is exact.
      rng = jax.random.fold_in(jax.random.key(seed), state.step)
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
