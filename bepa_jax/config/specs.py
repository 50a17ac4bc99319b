"""The run's configuration as typed, frozen values: built once, after validation, then passed.

`config/defaults.py` names every key (with its comment); these classes give each section a
type. `Specs.from_config` is the one place a ConfigDict is read below the command line:
every library takes the section it needs (`specs.loss`, `specs.data`, ...) as an argument.
Field names equal the config keys, so `--config.data.max_length=64` is `specs.data.max_length`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from bepa_jax.model import EncoderConfig


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """loss.*: L = L_mlm + weight * L_con; the InfoNCE options and its heads."""
  cls_input: str
  mlm_input: str
  weight: float
  temperature: float
  learn_temperature: bool
  temperature_min: float
  temperature_max: float
  margin: float
  symmetric: str
  negatives: str
  same_language_negatives: bool
  mask_self: bool
  mask_duplicates: bool
  projector_layers: int
  projector_dim: int
  predictor_layers: int
  predictor_dim: int
  ema_decay: float
  contrastive_chunk: int
  mlm_vocab_chunk: int



@dataclasses.dataclass(frozen=True)
class InitSpec:
  hf_dir: str
  allow_pickle: bool


@dataclasses.dataclass(frozen=True)
class DataSpec:
  source: str
  languages: str
  pairs: str
  temperature: float
  dedup: bool
  max_chars: int
  long_lines: str
  invalid_utf8: str
  tfds_data_dir: str
  cache_dir: str
  max_length: int
  packing: bool
  packed_rows: int
  packed_pair_rows: int
  mask_prob: float
  max_predictions_per_seq: int
  seed: int
  workers: int
  prefetch: int
  continue_on_new_data: bool


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
  path: str
  kind: str
  vocab_size: int
  model_type: str


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  learning_rate: float
  warmup_steps: int
  schedule: str
  end_lr_fraction: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  grad_clip_norm: float


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  global_batch: int
  grad_accum_steps: int
  gradcache_chunks: int
  steps: int
  seed: int
  dropout_rng: str
  log_every: int
  profile_start: int
  profile_steps: int
  host_malloc: str



@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
  every_steps: int
  every_minutes: float
  keep: int
  keep_best_metric: str
  keep_best_mode: str
  async_save: bool


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """mesh.*: sizes as configured (-1 = the rest) and the logical-axis rules."""
  data: int
  fsdp: int
  tensor: int
  dcn_data: int
  shard_optimizer: bool
  rules: tuple


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  every_steps: int
  tatoeba_dir: str
  langs: str
  parallel: str
  max_sentences: int
  batch_size: int
  pooling: str
  margin: str


_SECTIONS = {"loss": LossSpec, "init": InitSpec, "data": DataSpec, "tokenizer": TokenizerSpec,
             "optim": OptimSpec, "train": TrainSpec, "checkpoint": CheckpointSpec,
             "mesh": MeshSpec, "eval": EvalSpec}


def _typed(cls, section) -> Any:
  """One section -> its frozen dataclass, each value turned into the field's declared type."""
  kw = {}
  for f in dataclasses.fields(cls):
    value = section[f.name]
    if f.name == "rules":
      value = tuple((name, tuple(a) if isinstance(a, (list, tuple)) else a)
                    for name, a in value)
    else:
      value = {"int": int, "float": float, "bool": bool, "str": str}[f.type](value)
    kw[f.name] = value
  return cls(**kw)


@dataclasses.dataclass(frozen=True)
class Specs:
  """Every section of a validated config, typed. `model.vocab_size` may be 0 (the tokenizer's)
  until the build phase knows the tokenizer (`with_vocab`)."""
  model: EncoderConfig
  loss: LossSpec
  init: InitSpec
  data: DataSpec
  tokenizer: TokenizerSpec
  optim: OptimSpec
  train: TrainSpec
  checkpoint: CheckpointSpec
  mesh: MeshSpec
  eval: EvalSpec

  @classmethod
  def from_config(cls, config) -> "Specs":
    """A ConfigDict that `validate` accepted -> Specs (the only read of a ConfigDict)."""
    return cls(model=EncoderConfig.from_config(config.model),
               **{name: _typed(spec, config[name]) for name, spec in _SECTIONS.items()})

  def with_vocab(self, vocab_size: int) -> "Specs":
    return dataclasses.replace(self, model=EncoderConfig.from_config(self.model, vocab_size))

  def to_dict(self) -> dict:
    """The JSON-able form written to WORKDIR/config.json (sections of plain values)."""
    return dataclasses.asdict(self)
