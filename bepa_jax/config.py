"""Config checks that run before anything compiles, and small config helpers.

Every problem raises `ConfigError` whose message is one line naming the key;
`bepa-train` prints it and exits with status 2.
"""
from __future__ import annotations

import math

import ml_collections

from bepa_jax.errors import ConfigError  # noqa: F401  (re-exported)


_CHOICES = {
    "model.family": ("bert", "xlmr"),
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots_saveable"),
    "optim.schedule": ("linear", "cosine", "constant"),
    "tokenizer.model_type": ("unigram", "bpe"),
}


def _get(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def resolve_mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with -1 resolved; data includes dcn_data slices."""
  dcn = int(mesh_cfg.get("dcn_data", 1))
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  names = ["mesh.data", "mesh.fsdp", "mesh.tensor"]
  if dcn < 1:
    raise ConfigError(f"mesh.dcn_data must be >= 1, got {dcn}")
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError(f"at most one of mesh.data/fsdp/tensor may be -1, got {tuple(sizes)}")
  for n, s in zip(names, sizes):
    if s == 0 or s < -1:
      raise ConfigError(f"{n} must be a positive size or -1, got {s}")
  known = dcn * math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(
          f"mesh {dict(zip(names, sizes))} x dcn_data={dcn} cannot fill {num_devices} devices: "
          f"{num_devices} is not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if dcn * math.prod(sizes) != num_devices:
    raise ConfigError(
        f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} x dcn_data={dcn} = "
        f"{dcn * math.prod(sizes)} does not match the {num_devices} devices available")
  return sizes[0] * dcn, sizes[1], sizes[2]


def validate(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Checks `config` for `num_devices`; returns the resolved (data, fsdp, tensor) mesh."""
  for key, choices in _CHOICES.items():
    value = _get(config, key)
    if value not in choices:
      raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
  m = config.model
  for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size"):
    if int(m[key]) <= 0:
      raise ConfigError(f"model.{key} must be positive, got {m[key]}")
  if m.hidden_size % m.num_heads:
    raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by "
                      f"model.num_heads={m.num_heads}")
  for key in ("hidden_dropout", "attention_dropout"):
    if not 0.0 <= float(m[key]) < 1.0:
      raise ConfigError(f"model.{key} must be in [0, 1), got {m[key]}")
  if not float(config.loss.temperature) > 0.0:
    raise ConfigError(f"loss.temperature must be > 0, got {config.loss.temperature}")
  if float(config.loss.weight) < 0.0:
    raise ConfigError(f"loss.weight (lambda) must be >= 0, got {config.loss.weight}")
  _validate_loss_options(config.loss)
  d = config.data
  if int(d.max_length) < 3:
    raise ConfigError(f"data.max_length must be >= 3 ([CLS] s [SEP]), got {d.max_length}")
  positions_needed = int(d.max_length) + (
      int(m.pad_token_id) + 1 if m.family == "xlmr" else 0)
  if positions_needed > int(m.max_position_embeddings):
    raise ConfigError(
        f"data.max_length={d.max_length} needs {positions_needed} position embeddings but "
        f"model.max_position_embeddings={m.max_position_embeddings}")
  if not 0.0 < float(d.mask_prob) < 1.0:
    raise ConfigError(f"data.mask_prob must be in (0, 1), got {d.mask_prob}")
  if int(d.max_predictions_per_seq) < 1:
    raise ConfigError(f"data.max_predictions_per_seq must be >= 1, got {d.max_predictions_per_seq}")
  t = config.train
  if int(t.steps) < 1:
    raise ConfigError(f"train.steps must be >= 1, got {t.steps}")
  if int(t.global_batch) < 1:
    raise ConfigError(f"train.global_batch must be >= 1, got {t.global_batch}")
  if int(t.grad_accum_steps) < 1:
    raise ConfigError(f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}")
  if float(config.optim.learning_rate) <= 0:
    raise ConfigError(f"optim.learning_rate must be > 0, got {config.optim.learning_rate}")
  if int(config.optim.warmup_steps) < 0:
    raise ConfigError(f"optim.warmup_steps must be >= 0, got {config.optim.warmup_steps}")

  data, fsdp, tensor = resolve_mesh_shape(config.mesh, num_devices)
  shards = data * fsdp
  micro = int(t.global_batch) // int(t.grad_accum_steps)
  if int(t.global_batch) % int(t.grad_accum_steps):
    raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by "
                      f"train.grad_accum_steps={t.grad_accum_steps}")
  if micro % shards:
    raise ConfigError(
        f"train.global_batch={t.global_batch} (micro-batch {micro}) is not divisible by "
        f"the {shards} batch shards (mesh data={data} x fsdp={fsdp})")
  chunks = int(t.get("gradcache_chunks", 0))
  if chunks < 0:
    raise ConfigError(f"train.gradcache_chunks must be >= 0, got {chunks}")
  if chunks > 1:
    if int(t.grad_accum_steps) != 1:
      raise ConfigError(f"train.gradcache_chunks={chunks} and train.grad_accum_steps="
                        f"{t.grad_accum_steps}: use one or the other")
    if int(t.global_batch) % (chunks * shards):
      raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by "
                        f"train.gradcache_chunks={chunks} x {shards} batch shards")
  chunk = int(config.loss.contrastive_chunk)
  if chunk:  # the pool each device scores: the contrastive (micro-)batch, or its shard if local
    pool = int(t.global_batch) if chunks > 1 else micro
    if str(config.loss.negatives) == "local":
      pool //= shards
    if pool % chunk:
      raise ConfigError(f"loss.contrastive_chunk={chunk} must divide the {pool} candidates each "
                        f"device scores (train.global_batch={t.global_batch}, grad_accum_steps="
                        f"{t.grad_accum_steps}, loss.negatives={config.loss.negatives})")
  if m.num_heads % tensor:
    raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by mesh.tensor={tensor}")
  return data, fsdp, tensor


def _validate_loss_options(loss) -> None:
  from bepa_jax.objective import infonce  # local: config.py stays importable without jax
  opts = infonce.Options.from_config(loss)  # choices, margin, chunk combinations
  get = loss.get
  if opts.chunk and bool(loss.learn_temperature):
    raise ConfigError(f"loss.contrastive_chunk={opts.chunk} cannot be combined with "
                      f"loss.learn_temperature: set loss.contrastive_chunk=0")
  lo, hi = float(get("temperature_min", 0.01)), float(get("temperature_max", 1.0))
  if get("learn_temperature", False) and not 0.0 < lo <= float(loss.temperature) <= hi:
    raise ConfigError(f"loss.temperature={loss.temperature} must lie in [temperature_min="
                      f"{lo}, temperature_max={hi}] (and min > 0) when learned")
  for key in ("projector_layers", "projector_dim", "predictor_layers", "predictor_dim"):
    if int(get(key, 0)) < 0:
      raise ConfigError(f"loss.{key} must be >= 0, got {get(key)}")
  if not 0.0 <= float(get("ema_decay", 0.0)) < 1.0:
    raise ConfigError(f"loss.ema_decay must be in [0, 1), got {get('ema_decay')}")
