"""Config checks that run before anything compiles, and small config helpers.

Every problem raises `ConfigError` whose message is one line naming the key;
`bepa-train` prints it and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math

import ml_collections

from bepa_jax import host_memory
from bepa_jax import mesh as mesh_lib
from bepa_jax.errors import ConfigError
from bepa_jax.model import POOLINGS, EncoderConfig


_CHOICES = {
    "loss.symmetric": ("mean", "sum", "x2y", "y2x"),
    "loss.negatives": ("global", "local", "global_stopgrad"),
    "model.family": ("bert", "xlmr"),
    "model.dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots_saveable"),
    "optim.schedule": ("linear", "cosine", "constant"),
    "train.dropout_rng": ("threefry2x32", "rbg", "unsafe_rbg"),  # jax.random.key(impl=...)
    "tokenizer.model_type": ("unigram", "bpe"),
}


def get(config, dotted):
  """config["a"]["b"] for "a.b"."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """The one validation pass: checks `config` for `num_devices`; returns the resolved
  (data, fsdp, tensor) mesh. Every rule lives here (or in the function of the library that
  owns it, called from here), once, and runs before anything is built or written."""
  for key, choices in _CHOICES.items():
    value = get(config, key)
    if value not in choices:
      raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
  _validate_model(config.model, config.data)
  _validate_temperature(float(config.loss.temperature))
  if float(config.loss.weight) < 0.0:
    raise ConfigError(f"loss.weight (lambda) must be >= 0, got {config.loss.weight}")
  _validate_loss_options(config.loss)
  validate_checkpoint(config.checkpoint)
  _validate_eval(config)
  _validate_rules(config.mesh.rules)
  if not isinstance(config.mesh.shard_optimizer, bool):
    raise ConfigError(f"mesh.shard_optimizer must be True or False, got "
                      f"{config.mesh.shard_optimizer!r}")
  _validate_data(config.data)
  _validate_train(config.train, config.optim)
  shape = mesh_lib.resolve_shape(config.mesh, num_devices)
  _validate_layout(config, shape)
  _validate_split_dims(config, shape)
  return shape


def _validate_model(m, d) -> None:
  known = {f.name for f in dataclasses.fields(EncoderConfig)}
  unknown = sorted(set(m.keys()) - known)
  if unknown:
    raise ConfigError(f"model.{unknown[0]} is not an encoder setting (known: "
                      f"{', '.join(sorted(known))})")
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
  if int(d.max_length) < 3:
    raise ConfigError(f"data.max_length must be >= 3 ([CLS] s [SEP]), got {d.max_length}")
  positions_needed = int(d.max_length) + (
      int(m.pad_token_id) + 1 if m.family == "xlmr" else 0)
  if positions_needed > int(m.max_position_embeddings):
    raise ConfigError(
        f"data.max_length={d.max_length} needs {positions_needed} position embeddings but "
        f"model.max_position_embeddings={m.max_position_embeddings}")


def _validate_data(d) -> None:
  if not isinstance(d.packing, bool):
    raise ConfigError(f"data.packing must be True or False, got {d.packing!r}")
  for key in ("packed_rows", "packed_pair_rows"):
    if int(d[key]) < 0:
      raise ConfigError(f"data.{key} must be >= 0 (0 = chosen from the data), got {d[key]}")
  if not 0.0 < float(d.mask_prob) < 1.0:
    raise ConfigError(f"data.mask_prob must be in (0, 1), got {d.mask_prob}")
  if int(d.max_predictions_per_seq) < 1:
    raise ConfigError(f"data.max_predictions_per_seq must be >= 1, got {d.max_predictions_per_seq}")
  if int(d.seed) < 0:  # numpy's generators take no negative seed
    raise ConfigError(f"data.seed must be >= 0, got {d.seed}")
  if not math.isfinite(float(d.temperature)) or not float(d.temperature) > 0:
    raise ConfigError(f"data.temperature must be a finite number > 0, got {d.temperature}")
  if int(d.max_chars) < 1:
    raise ConfigError(f"data.max_chars must be >= 1, got {d.max_chars}")
  if "://" in str(d.cache_dir):
    raise ConfigError(f"data.cache_dir={d.cache_dir!r}: the record store is memory-mapped, so it "
                      f"needs a file system path (mount a bucket, e.g. with gcsfuse)")
  if int(d.workers) < 0 or int(d.prefetch) < 0:
    raise ConfigError(f"data.workers={d.workers} / data.prefetch={d.prefetch} must be >= 0")
  if int(d.workers) > 0 and int(d.prefetch) < 1:
    raise ConfigError(f"data.workers={d.workers} needs data.prefetch >= 1 (the batches they "
                      f"build ahead), got {d.prefetch}")
  if int(d.workers) > 0 and importlib.util.find_spec("grain") is None:
    raise ConfigError(f"data.workers={d.workers} needs the grain package (pip install "
                      f"'grain>=0.2.18', a dependency of bepa-jax); or data.workers=0")


def _validate_train(t, optim) -> None:
  if str(t.host_malloc) not in host_memory.MODES:
    raise ConfigError(f"train.host_malloc={t.host_malloc!r} must be one of "
                      f"{', '.join(host_memory.MODES)}")
  if int(t.profile_steps) < 0 or int(t.profile_start) < 0:
    raise ConfigError(f"train.profile_start={t.profile_start} / train.profile_steps="
                      f"{t.profile_steps} must be >= 0")
  if int(t.steps) < 0:  # 0: write the initial state (e.g. imported from init.hf_dir), no step
    raise ConfigError(f"train.steps must be >= 0, got {t.steps}")
  if int(t.global_batch) < 1:
    raise ConfigError(f"train.global_batch must be >= 1, got {t.global_batch}")
  if int(t.grad_accum_steps) < 1:
    raise ConfigError(f"train.grad_accum_steps must be >= 1, got {t.grad_accum_steps}")
  if not math.isfinite(float(optim.learning_rate)) or float(optim.learning_rate) <= 0:
    raise ConfigError(f"optim.learning_rate must be a finite number > 0, got "
                      f"{optim.learning_rate}")
  if int(optim.warmup_steps) < 0:
    raise ConfigError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps}")


def _validate_layout(config, shape: tuple[int, int, int]) -> None:
  """How the batch splits over the resolved mesh: shards, micro-batches, chunks, packing."""
  data, fsdp, _ = shape
  t, d = config.train, config.data
  shards = data * fsdp
  micro = int(t.global_batch) // int(t.grad_accum_steps)
  if int(t.global_batch) % int(t.grad_accum_steps):
    raise ConfigError(f"train.global_batch={t.global_batch} is not divisible by "
                      f"train.grad_accum_steps={t.grad_accum_steps}")
  if micro % shards:
    raise ConfigError(
        f"train.global_batch={t.global_batch} (micro-batch {micro}) is not divisible by "
        f"the {shards} batch shards (mesh data={data} x fsdp={fsdp})")
  chunks = int(t.gradcache_chunks)
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
    check_chunk(chunk, pool, f" (train.global_batch={t.global_batch}, grad_accum_steps="
                        f"{t.grad_accum_steps}, loss.negatives={config.loss.negatives})")
  if bool(d.packing):  # a packing group: one batch shard's share of one micro-batch
    group = int(t.global_batch) // (shards * packing_micro_batches(t))
    for key, most in (("packed_rows", 2 * group), ("packed_pair_rows", group)):
      if int(d[key]) > most:
        raise ConfigError(f"data.{key}={d[key]} exceeds the {most} sequences of a packing group "
                          f"({group} pairs = train.global_batch / batch shards / micro-batches): "
                          f"one per row is the padded layout")


# the model dimensions a logical axis of mesh.rules names: each must divide over its mesh axes
SPLIT_DIMS = (("heads", "num_heads"), ("vocab", "vocab_size"), ("mlp", "intermediate_size"),
              ("embed", "hidden_size"))


def _validate_split_dims(config, shape: tuple[int, int, int]) -> None:
  """Every weight dimension split over mesh axes divides by them (XLM-R's 250,002 words do
  not by mesh.tensor=4): one line naming the key, before anything is compiled."""
  sizes = dict(zip(mesh_lib.AXES, shape))
  rules = dict(mesh_lib.rules(config.mesh))
  for logical, key in SPLIT_DIMS:
    axes = mesh_lib.spec_axes(rules.get(logical))
    if not axes:
      continue
    dim, ways = int(config.model[key]), math.prod(sizes[a] for a in axes)
    if dim % ways:
      split = " x ".join(f"mesh.{a}={sizes[a]}" for a in axes)
      raise ConfigError(f"model.{key}={dim} is not divisible by {split} (mesh.rules splits "
                        f"{logical!r} over {'/'.join(axes)})")


def packing_micro_batches(train_cfg) -> int:
  """The k micro-batches (or GradCache chunks) a step splits into; packing groups follow them."""
  return max(int(train_cfg.grad_accum_steps), int(train_cfg.gradcache_chunks), 1)


# Smallest tau: the logits cos/tau span +-1/tau. Beyond +-1000 bfloat16 (8 significant bits)
# resolves them only to ~4, the gradients grow as 1/tau, and below ~3e-39 1/tau overflows
# float32 itself: a loss that goes non-finite there is the temperature, not the learning rate.
MIN_TEMPERATURE = 1e-3


def _validate_temperature(tau: float) -> None:
  if not math.isfinite(tau):
    raise ConfigError(f"loss.temperature must be a finite number, got {tau}")
  if not tau > 0.0:
    raise ConfigError(f"loss.temperature must be > 0, got {tau}")
  if tau < MIN_TEMPERATURE:
    raise ConfigError(f"loss.temperature={tau:g} is below {MIN_TEMPERATURE:g}: the logits cos/tau "
                      f"would reach +-{1 / tau:.3g}, too large for float32/bfloat16 training "
                      f"(precision loss, 1/tau gradients, overflow)")


def _validate_loss_options(loss) -> None:
  _validate_contrastive(loss)
  check_static_temperature(int(loss.contrastive_chunk), bool(loss.learn_temperature))
  lo, hi = float(loss.temperature_min), float(loss.temperature_max)
  if bool(loss.learn_temperature) and not 0.0 < lo <= float(loss.temperature) <= hi:
    raise ConfigError(f"loss.temperature={loss.temperature} must lie in [temperature_min="
                      f"{lo}, temperature_max={hi}] (and min > 0) when learned")
  if bool(loss.learn_temperature) and lo < MIN_TEMPERATURE:
    raise ConfigError(f"loss.temperature_min={lo:g} is below {MIN_TEMPERATURE:g}: a learned tau "
                      f"clamped there gives logits cos/tau of +-{1 / lo:.3g}")
  for key in ("projector_layers", "projector_dim", "predictor_layers", "predictor_dim"):
    if int(loss[key]) < 0:
      raise ConfigError(f"loss.{key} must be >= 0, got {loss[key]}")
  if int(loss.mlm_vocab_chunk) < 0:  # any V streams (the last chunk may be shorter)
    raise ConfigError(f"loss.mlm_vocab_chunk must be >= 0 (0 = the dense [positions, vocab] "
                      f"logits), got {loss.mlm_vocab_chunk}")
  if not 0.0 <= float(loss.ema_decay) < 1.0:
    raise ConfigError(f"loss.ema_decay must be in [0, 1), got {loss.ema_decay}")
  if str(loss.cls_input) not in ("masked", "clean"):
    raise ConfigError(f"loss.cls_input must be masked or clean, got {loss.cls_input!r}")
  if str(loss.mlm_input) not in ("sentence", "pair"):
    raise ConfigError(f"loss.mlm_input must be sentence or pair, got {loss.mlm_input!r}")
  if str(loss.mlm_input) == "pair" and str(loss.cls_input) != "clean":
    raise ConfigError("loss.mlm_input=pair needs loss.cls_input=clean: the [CLS] of a pair "
                      "sequence is not a sentence embedding")


def validate_checkpoint(ckpt_cfg) -> None:
  for key in ("every_steps", "every_minutes"):
    if float(ckpt_cfg[key]) < 0:
      raise ConfigError(f"checkpoint.{key} must be >= 0 (0 disables it), got {ckpt_cfg[key]}")
  if int(ckpt_cfg.keep) < 1:
    raise ConfigError(f"checkpoint.keep must be >= 1, got {ckpt_cfg.keep}")
  if ckpt_cfg.keep_best_mode not in ("min", "max"):
    raise ConfigError(f"checkpoint.keep_best_mode={ckpt_cfg.keep_best_mode!r} is not one of "
                      f"min, max")
  name = str(ckpt_cfg.keep_best_metric)
  if name and name not in STEP_METRICS and not name.startswith("eval/"):
    import difflib
    close = difflib.get_close_matches(name, STEP_METRICS, n=1)
    raise ConfigError(f"checkpoint.keep_best_metric={name!r} is not a metric the trainer saves"
                      + (f" (did you mean {close[0]!r}?)" if close else "") + f"; known: "
                      f"{', '.join(STEP_METRICS)}, or eval/<name> of the periodic evaluation")


# What a train step reports (objective/loss.py, objective/infonce.py, training/step.py): the
# names checkpoint.keep_best_metric can rank by, besides eval/... when eval.every_steps > 0.
STEP_METRICS = ("loss", "mlm_loss", "mlm_accuracy", "contrastive_loss", "acc_x2y", "acc_y2x",
                "pos_cos", "neg_cos", "temperature", "grad_norm", "learning_rate")


def split_list(s) -> list[str]:
  """'a, b,,c' -> ['a', 'b', 'c'] (comma-separated config values)."""
  return [x.strip() for x in str(s).split(",") if x.strip()]


def _validate_eval(config) -> None:
  """eval.* (only when eval.every_steps > 0): settings and the files they name."""
  import os

  e = config.eval
  if int(e.every_steps) <= 0:
    return
  if not e.tatoeba_dir and not e.parallel:
    raise ConfigError("eval.every_steps > 0 needs eval.tatoeba_dir and/or eval.parallel")
  if e.tatoeba_dir and not os.path.isdir(e.tatoeba_dir):
    raise ConfigError(f"eval.tatoeba_dir={e.tatoeba_dir!r} is not a directory")
  if e.parallel:
    files = split_list(e.parallel)
    if len(files) < 2:
      raise ConfigError(f"eval.parallel={e.parallel!r} must list at least 2 comma-separated files")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise ConfigError(f"eval.parallel: {missing[0]}: no such file")
  pools = split_list(e.pooling)
  if not pools or any(p not in POOLINGS for p in pools):
    raise ConfigError(f"eval.pooling={e.pooling!r} must name cls and/or mean")
  if e.margin not in ("", "ratio", "distance"):
    raise ConfigError(f"eval.margin={e.margin!r} is not one of '', ratio, distance")
  if int(e.max_sentences) < 0 or int(e.batch_size) < 1:
    raise ConfigError("eval.max_sentences must be >= 0 and eval.batch_size >= 1")


def _validate_rules(rules) -> None:
  """mesh.rules: (logical axis name, mesh axis | tuple of mesh axes | None) pairs."""
  if isinstance(rules, str) or not isinstance(rules, (tuple, list)):
    raise ConfigError(f"mesh.rules={rules!r} must be a tuple of (logical axis, mesh axes) pairs")
  for rule in rules:
    if (isinstance(rule, str) or not isinstance(rule, (tuple, list)) or len(rule) != 2
        or not isinstance(rule[0], str)):
      raise ConfigError(f"mesh.rules entry {rule!r} is not a (logical axis, mesh axes) pair: "
                        f"mesh.rules must be a tuple of them, e.g. (('batch', ('data', 'fsdp')), "
                        f"('vocab', 'tensor'))")
    target = rule[1]
    axes = [] if target is None else [target] if isinstance(target, str) else target
    if not isinstance(axes, (tuple, list)) or any(a not in mesh_lib.AXES for a in axes):
      raise ConfigError(f"mesh.rules entry {tuple(rule)!r}: mesh axes must be None or among "
                        f"{', '.join(mesh_lib.AXES)}")


# --- the InfoNCE options (objective/infonce.py calls check_chunk and check_static_temperature
# again at trace time, for callers that bypass the config: the same rule, one definition) ---
def _validate_contrastive(loss) -> None:
  margin, chunk = float(loss.margin), int(loss.contrastive_chunk)
  if margin < 0.0:
    raise ConfigError(f"loss.margin must be >= 0, got {margin}")
  if chunk < 0:
    raise ConfigError(f"loss.contrastive_chunk must be >= 0, got {chunk}")
  if chunk:
    clash = [k for k, on in (("loss.margin", margin != 0.0),
                             ("loss.same_language_negatives", bool(loss.same_language_negatives)),
                             ("loss.mask_duplicates", bool(loss.mask_duplicates))) if on]
    if clash:
      raise ConfigError(f"loss.contrastive_chunk={chunk} cannot be combined with "
                        f"{', '.join(clash)}: set loss.contrastive_chunk=0")


def check_chunk(chunk: int, candidates: int, context: str = " (the (micro-)batch, or its "
                "shard with loss.negatives=local)") -> None:
  """The chunked form scores the candidates `chunk` columns at a time: it must divide them.
  (The validation pass gives the config's terms in `context`.)"""
  if candidates % chunk:
    raise ConfigError(f"loss.contrastive_chunk={chunk} must divide the {candidates} candidates "
                      f"each device scores{context}")


def check_static_temperature(chunk: int, learned: bool) -> None:
  """The chunked form's custom VJP takes 1/tau as a constant: a learned tau cannot stream."""
  if chunk and learned:
    raise ConfigError(f"loss.contrastive_chunk={chunk} cannot be combined with "
                      f"loss.learn_temperature: set loss.contrastive_chunk=0")
