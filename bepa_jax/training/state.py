"""Train state, optimizer and its schedule, and the sharded initialisation of both; the one
definition of the state (`model_parts`) that bepa-train and bepa-compile build."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bepa_jax.data import batch_spec
from bepa_jax.objective import heads as heads_lib
from bepa_jax import mesh as mesh_lib
from bepa_jax.model import BepaEncoder, EncoderConfig


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  ema_params: Any = None  # EMA target encoder (+ projector) when loss.ema_decay > 0

  def apply_gradients(self, grads):
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state)


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0, then linear / cosine decay to end_lr_fraction * lr, or constant."""
  lr = float(optim_cfg.learning_rate)
  warmup = int(optim_cfg.warmup_steps)
  end = lr * float(optim_cfg.end_lr_fraction)
  decay_steps = max(int(total_steps) - warmup, 1)
  if optim_cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim_cfg.end_lr_fraction))
  elif optim_cfg.schedule == "linear":
    after = optax.linear_schedule(lr, end, decay_steps)
  else:
    after = optax.constant_schedule(lr)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings) only: not on biases or LayerNorm."""
  def is_decayed(path, _):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]  # skips Partitioned.value
    return bool(keys) and keys[-1] in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def create_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
  parts = []
  if float(optim_cfg.grad_clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip_norm)))
  parts.append(optax.adamw(learning_rate_schedule(optim_cfg, total_steps),
                           b1=float(optim_cfg.b1), b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                           weight_decay=float(optim_cfg.weight_decay), mask=decay_mask))
  return optax.chain(*parts)


def init_fn(model: nn.Module, tx, example_inputs: dict, head=None,
            ema: bool = False) -> Callable[[jax.Array], TrainState]:
  """rng -> boxed TrainState (parameters carry their logical axis names).

  head: optional heads.ContrastiveHead, its params under params["bepa_head"];
  ema: keep an EMA target copy of the encoder (+ projector) in `ema_params`.
  """
  def init(rng):
    variables = model.init(rng, **example_inputs)
    params = variables["params"]
    if head is not None:
      params = {**params, heads_lib.HEAD_KEY: heads_lib.init_params(
          head, jax.random.fold_in(rng, 1), model.cfg.hidden_size)}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), tx=tx,
                      ema_params=heads_lib.ema_target(params) if ema else None)
  return init


def state_shardings(boxed, mesh, mesh_cfg):
  """The state's NamedShardings: parameters (and the optimizer state, the EMA copy) by their
  logical axes; with mesh.shard_optimizer (ZeRO-1) the optimizer state is also split over the
  batch axes (mesh.shard_over_batch). The jitted step's in/out shardings then make each batch
  shard update its slice of the optimizer state and gather the new parameters back."""
  shardings = nn.meta.unbox(mesh_lib.logical_shardings(boxed, mesh, mesh_cfg))
  shardings = shardings.replace(step=mesh_lib.replicated(mesh))
  if bool(mesh_cfg.shard_optimizer):
    shapes = nn.meta.unbox(boxed).opt_state
    shardings = shardings.replace(opt_state=jax.tree.map(
        lambda sh, s: mesh_lib.shard_over_batch(sh, s.shape), shardings.opt_state, shapes))
  return shardings


def create_sharded_state(model, tx, example_inputs, rng, mesh, mesh_cfg, head=None,
                         ema: bool = False):
  """Initialises the state directly into its shardings (no host copy of the full model).

  Returns (state, state_shardings) with plain (unboxed) arrays.
  """
  init = init_fn(model, tx, example_inputs, head, ema)
  boxed = jax.eval_shape(init, rng)
  shardings = state_shardings(boxed, mesh, mesh_cfg)
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.rules(mesh_cfg)):
    state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def abstract_state(model, tx, example_inputs, rng, mesh, mesh_cfg, head=None, ema: bool = False):
  """ShapeDtypeStructs of the state carrying the target shardings (for Orbax restore)."""
  init = init_fn(model, tx, example_inputs, head, ema)
  boxed = jax.eval_shape(init, rng)
  shardings = state_shardings(boxed, mesh, mesh_cfg)
  shapes = nn.meta.unbox(boxed)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings), shardings


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def example_inputs(config) -> dict:
  """The encoder's init arguments, from the batch spec (data/batch_spec.py)."""
  return batch_spec.example_inputs(int(config.data.max_length),
                                   int(config.data.max_predictions_per_seq))


@dataclasses.dataclass
class ModelParts:
  """The model, its optimizer and schedule, and the arguments of the state builders above."""
  model: BepaEncoder
  schedule: Any
  tx: Any
  init_args: tuple
  init_kwargs: dict


def model_parts(config: ml_collections.ConfigDict, model_cfg: EncoderConfig, mesh) -> ModelParts:
  """What trainer/build.py and bepa-compile (bepa_jax/aot/compile.py) share: one definition of
  the state."""
  model = BepaEncoder(model_cfg)
  steps = int(config.train.steps)
  schedule = learning_rate_schedule(config.optim, steps)
  tx = create_optimizer(config.optim, steps)
  init_args = (model, tx, example_inputs(config), jax.random.key(int(config.train.seed)), mesh,
               config.mesh)
  init_kwargs = dict(head=heads_lib.from_config(config.loss, model_cfg.hidden_size),
                     ema=heads_lib.uses_ema(config.loss))
  return ModelParts(model, schedule, tx, init_args, init_kwargs)
