"""A model to evaluate: a training workdir (config.json + tokenizer + Orbax checkpoint) or an
HF directory (config.json + model.safetensors + a tokenizer), as (model, params, tokenizer)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from bepa_jax.config import defaults
from bepa_jax.config import load as config_load
from bepa_jax.checkpoint import reader
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.data import tokenizers as tokenizers_lib
from bepa_jax.errors import InputError
from bepa_jax.hf import convert as hf_convert
from bepa_jax.hf import files as hf_files
from bepa_jax.hf import init as hf_init
from bepa_jax.model import BepaEncoder, EncoderConfig


@dataclasses.dataclass
class Loaded:
  name: str
  model_cfg: EncoderConfig
  params: Any               # plain tree {embeddings, encoder, mlm_head} (host or device arrays)
  tokenizer: tokenizer_lib.Tokenizer
  mesh_cfg: ml_collections.ConfigDict
  max_length: int

  @property
  def model(self) -> BepaEncoder:
    return BepaEncoder(self.model_cfg)


def is_hf_dir(path: str) -> bool:
  """HF weights, a sentence-transformers model (its encoder may be a subfolder), or an HF
  config.json (so a dir that lost its weights says so, not that it lacks a training workdir's
  tokenizer or checkpoints)."""
  if any(os.path.isfile(os.path.join(path, f))
         for f in hf_files.WEIGHT_FILES + (hf_files.ST_MODULES,)):
    return True
  try:
    with open(os.path.join(path, hf_files.CONFIG_NAME)) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(saved, dict) and ("model_type" in saved or "architectures" in saved)


def load_workdir(workdir: str, tokenizer_path: str | None = None) -> Loaded:
  config = config_load.read_saved(workdir)
  _, params = reader.read_params(workdir)  # first: missing weights are named as such
  if tokenizer_path:
    tokenizer = tokenizers_lib.load(tokenizer_path)
  else:  # what training used: config.tokenizer.path (any kind) or the workdir's own model
    from bepa_jax.data import factory
    tokenizer = factory.load_tokenizer(config, workdir, train_if_missing=False,
                                       hf_dir=hf_init.tokenizer_dir(config))
  model_cfg = EncoderConfig.from_config(config.model, vocab_size=tokenizer.vocab_size)
  return Loaded(os.path.basename(os.path.normpath(workdir)), model_cfg, params, tokenizer,
                config.mesh, int(config.data.max_length))


def load_hf_dir(hf_dir: str, tokenizer_path: str | None = None) -> Loaded:
  """max_length: the sentence-transformers max_seq_length beside the encoder (an export's is
  its run's data.max_length, so it scores as its workdir does), else 128."""
  model_cfg, params = hf_convert.load_hf(hf_dir)
  model_dir = hf_files.resolve_model_dir(hf_dir)
  tokenizer = tokenizers_lib.load(tokenizer_path or model_dir)
  length = hf_files.st_max_seq_length(model_dir) or 128
  return Loaded(os.path.basename(os.path.normpath(hf_dir)), model_cfg, params, tokenizer,
                defaults.get_config().mesh, min(length, max_tokens(model_cfg)))


def max_tokens(model_cfg: EncoderConfig) -> int:
  """The longest sentence (with [CLS] and [SEP]) the position embeddings cover: XLM-R's
  positions start at pad_token_id + 1. Longer inputs gather outside the table (NaN)."""
  offset = model_cfg.pad_token_id + 1 if model_cfg.family == "xlmr" else 0
  return int(model_cfg.max_position_embeddings - offset)


def load(path: str, tokenizer_path: str | None = None, hf: bool = False) -> Loaded:
  """An HF directory (`hf`, or told apart by its weight files or config.json) or a workdir."""
  if not os.path.isdir(path):
    raise InputError(f"{path}: directory not found")
  if hf or is_hf_dir(path):
    return load_hf_dir(path, tokenizer_path)
  return load_workdir(path, tokenizer_path)
