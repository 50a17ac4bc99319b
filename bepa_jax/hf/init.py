"""Continued pretraining from a local HuggingFace checkpoint (`--config.init.hf_dir=DIR`).

The paper continued pretraining of xlm-roberta-base; mBERT-style BERT works the same way.
DIR may be a *ForMaskedLM checkpoint or an encoder-only one (BertModel, XLMRobertaModel, a
sentence-transformers model such as all-MiniLM-L6-v2 or LaBSE, read from the folder its
modules.json names): without an MLM head, the head starts fresh (decoder tied to the word
embeddings), which is logged once.
From DIR we take the model shape (config.json overrides `config.model`), the weights
(model.safetensors; pickle .bin only with `init.allow_pickle=True`) and, unless
`tokenizer.path` is set, the tokenizer (tokenizer.json, XLM-R's sentencepiece.bpe.model, or
our own exported spm.model). Nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import os

from bepa_jax.errors import ConfigError, HFFormatError, InputError
from bepa_jax.hf import convert, files, keymaps
from bepa_jax.model import HF_FIELDS as SHAPE_FIELDS  # config.model keys from HF config.json

log = logging.getLogger("bepa")


def apply_to_config(config) -> None:
  """Overwrites the model-shape keys of `config.model` with those of init.hf_dir/config.json.

  Also checks that the weight files are there and whole: this runs first, so a missing or
  cut-off model.safetensors stops the run before anything is written to the workdir.
  """
  hf_dir = model_dir(config)
  path = os.path.join(hf_dir, files.CONFIG_NAME)
  if not os.path.isfile(path):
    raise InputError(f"init.hf_dir: {path} not found")
  cfg = convert.encoder_config_from_hf(files.read_config(path))
  try:
    files.check_weights(hf_dir, allow_pickle=bool(config.init.allow_pickle),
                        pickle_flag=files.PICKLE_FLAG)
  except HFFormatError as e:  # the file alone does not say which flag named it
    raise HFFormatError(f"init.hf_dir: {e}") from None
  for field in SHAPE_FIELDS:
    config.model[field] = getattr(cfg, field)


def load_params(config, model_cfg):
  """HF weights as a plain numpy tree laid out for `model_cfg` (stacked when scan_layers)."""
  info: dict = {}  # has_head, ignored: for log_import_notes
  hf_cfg, params = convert.load_hf(str(config.init.hf_dir), info=info,
                                   allow_pickle=bool(config.init.allow_pickle),
                                   pickle_flag=files.PICKLE_FLAG)
  log_import_notes(str(config.init.hf_dir), info)
  for field in SHAPE_FIELDS:
    if getattr(hf_cfg, field) != getattr(model_cfg, field):
      raise ConfigError(f"model.{field}={getattr(model_cfg, field)} differs from "
                        f"{config.init.hf_dir}/config.json ({getattr(hf_cfg, field)})")
  return keymaps.stack_layers(params) if model_cfg.scan_layers else keymaps.unstack_layers(params)


def model_dir(config) -> str:
  """init.hf_dir, or the folder of a sentence-transformers model that holds its encoder."""
  return files.resolve_model_dir(str(config.init.hf_dir))


def tokenizer_dir(config) -> str | None:
  """Where the run's tokenizer comes from when init.hf_dir is set (`model_dir`), else None:
  the `hf_dir` of data.factory.load_tokenizer."""
  return model_dir(config) if config.init.hf_dir else None


def log_import_notes(hf_dir: str, info: dict) -> None:
  """One line for a missing MLM head and one for ignored tensors: never silent."""
  if not info.get("has_head", True):
    log.info("init.hf_dir: %s has no MLM head (an encoder-only checkpoint): the MLM head starts "
             "fresh, its decoder tied to the word embeddings", hf_dir)
  pooler = [k for k in info.get("ignored", ()) if "pooler." in k]
  if pooler:
    log.info("init.hf_dir: %s: the pooler (%s) is not part of this model and is ignored", hf_dir,
             ", ".join(pooler))
