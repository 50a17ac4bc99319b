"""The build phase of a run: config -> mesh -> tokenizer and data -> model and sharded state ->
jitted step, for `bepa-train` (the state's definition, model_parts, is training/state.py's,
shared with `bepa-compile`)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bepa_jax.checkpoint import store as ckpt_lib
from bepa_jax.config import validate as config_lib
from bepa_jax.config.specs import Specs
from bepa_jax.hf import init as hf_init
from bepa_jax import mesh as mesh_lib
from bepa_jax.training import step as step_lib
from bepa_jax.training import state as train_state
from bepa_jax.training.state import model_parts
from bepa_jax.trainer import guard
from bepa_jax.data import factory as data_factory
from bepa_jax.data import pipeline as pipeline_lib
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.errors import ConfigError
from bepa_jax.model import BepaEncoder, EncoderConfig

log = logging.getLogger("bepa")


# ----------------------------------------------------------------------------- build
@dataclasses.dataclass
class Job:
  """Everything a run needs, built from the config before the first step."""
  config: Specs                      # the run's typed, validated config (config/specs.py)
  mesh: Any
  tokenizer: tokenizer_lib.Tokenizer
  pipeline: pipeline_lib.Pipeline
  model_cfg: EncoderConfig
  model: BepaEncoder
  state: train_state.TrainState
  shardings: Any
  step_fn: Any


def build(config: ml_collections.ConfigDict | Specs, workdir: str, devices=None,
          ckpt=None, opened=None) -> Job:
  """Specs (or a config, validated here) -> mesh -> tokenizer and data -> model and sharded
  state -> jitted step. Below this function no ConfigDict is read: libraries take specs.

  With a checkpoint.store.Checkpointer, the state is restored from its latest readable checkpoint
  (straight into this mesh's shardings) instead of initialised, when there is one. `opened`:
  data.factory.open_configured_sources' result, when the caller opened the sources already.
  """
  devices = list(jax.devices() if devices is None else devices)
  config = config if isinstance(config, Specs) else check_config(config, len(devices))
  shape = mesh_lib.resolve_shape(config.mesh, len(devices))  # validated: the pass resolved it
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  log.info("mesh %s on %d devices (%d processes)", dict(zip(mesh_lib.AXES, shape)),
           len(devices), jax.process_count())
  # the sources opened (and checked) once, before config.json is written or a tokenizer trained
  opened = opened or data_factory.open_configured_sources(config.data)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)

  tokenizer = data_factory.load_tokenizer(config, workdir, hf_dir=hf_init.tokenizer_dir(config),
                                          opened=opened)
  pipeline = data_factory.build_pipeline(config, tokenizer, shape[0] * shape[1], opened=opened)
  if pipeline.truncated:
    log.info("%d sentences are longer than data.max_length=%d and are truncated",
             pipeline.truncated, config.data.max_length)
  model_cfg = EncoderConfig.from_config(config.model, vocab_size=tokenizer.vocab_size)
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                      f"{tokenizer.vocab_size} pieces")
  parts = model_parts(config, model_cfg, mesh)
  model, schedule, init_args, init_kwargs = (parts.model, parts.schedule, parts.init_args,
                                             parts.init_kwargs)
  restored = None
  if ckpt is not None:  # abstract arrays carry this mesh's shardings: any saved mesh restores
    abstract, shardings = train_state.abstract_state(*init_args, **init_kwargs)
    restored = _restore(ckpt, abstract, tokenizer, config, workdir)
  if jax.process_index() == 0:  # once the checkpoints are known to fit this run
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2)
  if restored is not None:
    state = ckpt_lib.restore_state(abstract, restored)
    guard.check_resumed_data(pipeline, restored, config)
    log.info("resumed from checkpoint step %d in %s (saved on mesh %s)", restored.step,
             ckpt.directory, restored.meta.get("mesh"))
  else:
    state, shardings = train_state.create_sharded_state(*init_args, **init_kwargs)
    if config.init.hf_dir:  # continued pretraining: encoder + MLM head from HF, fresh optimizer
      hf_params = hf_init.load_params(config, model_cfg)
      params = dict(state.params)
      for name, subtree in hf_params.items():
        params[name] = jax.device_put(subtree, shardings.params[name])
      state = state.replace(params=params)
      if state.ema_params is not None:  # the EMA target starts from the same weights
        ema = dict(state.ema_params)
        ema.update({k: jax.tree.map(jnp.copy, params[k]) for k in hf_params if k in ema})
        state = state.replace(ema_params=ema)
      log.info("initialised from %s", config.init.hf_dir)
  log.info("model: %s, %.2fM parameters", model_cfg.family,
           train_state.count_params(state.params) / 1e6)
  step_fn = step_lib.make_train_step(model, config, mesh, shardings, schedule)
  return Job(config, mesh, tokenizer, pipeline, model_cfg, model, state, shardings, step_fn)


def _restore(ckpt, abstract, tokenizer, config, workdir: str):
  """The latest readable checkpoint; a word-embedding table of another size is named as the
  tokenizer that changed (both sizes, the file), not as damaged checkpoints."""
  try:
    return ckpt.restore_latest(abstract)
  except ckpt_lib.ShapeMismatch as e:
    if "embed" not in e.key or e.saved[:1] == e.built[:1]:
      raise
    path = (config.tokenizer.path or hf_init.tokenizer_dir(config)
            or os.path.join(workdir, "tokenizer", "spm.model"))
    raise ConfigError(f"the tokenizer {path} ({tokenizer.vocab_size} pieces) does not match the "
                      f"checkpoints in {ckpt.directory}, trained with a {e.saved[0]}-token "
                      f"vocabulary (checkpoint {e.step}: params{e.key} {e.saved}, this run "
                      f"{e.built}): put their tokenizer back or use a new --workdir; nothing "
                      f"was changed") from None


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> Specs:
  """The one validation pass, before a tokenizer is trained or a file written (bepa-sweep runs
  it for every grid point before the first run), and the config turned into typed specs.
  init.hf_dir's shape (and that its weights are whole) first: the config is compared with the
  workdir's checkpoints after this."""
  if config.init.hf_dir:
    hf_init.apply_to_config(config)
  config_lib.validate(config, num_devices)
  return Specs.from_config(config)
