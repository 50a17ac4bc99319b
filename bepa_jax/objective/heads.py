"""Optional parameters of the contrastive objective, kept next to the encoder's.

They live under one extra top-level key, `params["bepa_head"]`, so the encoder's own
tree (embeddings, encoder, mlm_head) keeps its layout and its HF key map:
  projector        MLP on [CLS] before normalisation (SimCLR-style), both sides
  predictor        MLP on the context (anchor) side only (the JEPA form)
  log_temperature  learned log tau; tau = clip(exp(log_tau), temperature_min, temperature_max)
An EMA target encoder (`loss.ema_decay > 0`) keeps a second copy of the encoder and the
projector in `TrainState.ema_params`, updated after every optimiser step, never by gradients.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bepa_jax import model as model_lib

HEAD_KEY = "bepa_head"


class MLP(nn.Module):
  """Dense layers with exact GELU between them (none after the last)."""
  features: tuple

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    for i, f in enumerate(self.features):
      x = nn.Dense(f, kernel_init=nn.initializers.normal(0.02), name=f"dense_{i}")(x)
      if i < len(self.features) - 1:
        x = jax.nn.gelu(x, approximate=False)
    return x


class ContrastiveHead(nn.Module):
  projector: tuple = ()              # layer widths; () = identity
  predictor: tuple = ()              # layer widths; () = identity (last = projector output)
  learn_temperature: bool = False
  init_temperature: float = 0.07

  def setup(self):
    if self.projector:
      self.proj = MLP(self.projector)
    if self.predictor:
      self.pred = MLP(self.predictor)
    if self.learn_temperature:
      self.log_temperature = self.param(
          "log_temperature", nn.initializers.constant(math.log(self.init_temperature)), ())

  def project(self, h):
    return self.proj(h) if self.projector else h.astype(jnp.float32)

  def predict(self, z):
    return self.pred(z) if self.predictor else z

  def log_tau(self):
    return self.log_temperature

  def __call__(self, h):  # used by init only: touches every parameter
    z = self.predict(self.project(h))
    return z, (self.log_temperature if self.learn_temperature else None)


def from_config(loss_cfg, hidden_size: int) -> ContrastiveHead | None:
  """The head described by `config.loss`, or None when it would have no parameters."""
  proj_layers, pred_layers = int(loss_cfg.projector_layers), int(loss_cfg.predictor_layers)
  proj_dim = int(loss_cfg.projector_dim) or hidden_size
  pred_dim = int(loss_cfg.predictor_dim) or proj_dim
  out_dim = proj_dim if proj_layers else hidden_size
  projector = (proj_dim,) * proj_layers
  predictor = (pred_dim,) * (pred_layers - 1) + (out_dim,) if pred_layers else ()
  learn = bool(loss_cfg.learn_temperature)
  if not (projector or predictor or learn):
    return None
  return ContrastiveHead(projector, predictor, learn, float(loss_cfg.temperature))


def uses_ema(loss_cfg) -> bool:
  return float(loss_cfg.ema_decay) > 0.0


def head_params(params):
  return params.get(HEAD_KEY) if hasattr(params, "get") else None


def init_params(head: ContrastiveHead, rng, hidden_size: int):
  return head.init(rng, jnp.zeros((1, hidden_size), jnp.float32))["params"]


def ema_target(params) -> Any:
  """The part of `params` an EMA target copies: the encoder and the projector."""
  out = model_lib.encoder_params(params)
  h = head_params(params)
  if h is not None and "proj" in h:
    out[HEAD_KEY] = {"proj": h["proj"]}
  return out


def ema_update(ema_params, params, decay: float):
  """ema <- decay * ema + (1 - decay) * online, leaf by leaf."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, ema_target(params))


def temperature(head: ContrastiveHead | None, hparams, loss_cfg):
  """tau as a traced scalar when learned (clamped), else the config float."""
  if head is None or not head.learn_temperature:
    return float(loss_cfg.temperature)
  log_tau = head.apply({"params": hparams}, method=ContrastiveHead.log_tau)
  return jnp.clip(jnp.exp(log_tau), float(loss_cfg.temperature_min),
                  float(loss_cfg.temperature_max))
