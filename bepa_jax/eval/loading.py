"""A model to evaluate: a training workdir (config.json + tokenizer + Orbax checkpoint) or an
HF directory (config.json + model.safetensors + a tokenizer), as (model, params, tokenizer)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np

from bepa_jax import default_config
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.errors import InputError
from bepa_jax.model import BepaEncoder, EncoderConfig

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


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


class HFTokenizer(tokenizer_lib.Tokenizer):
  """A `transformers` tokenizer behind the project's Tokenizer interface (local files only)."""

  def __init__(self, path: str):
    try:
      from transformers import AutoTokenizer
    except ImportError:
      raise InputError(f"{path}: reading an HF tokenizer needs `pip install bepa-jax[hf]`") from None
    self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    t = self.tok
    self.vocab_size = len(t)
    self.pad_id, self.unk_id = t.pad_token_id, t.unk_token_id
    self.cls_id = t.cls_token_id if t.cls_token_id is not None else t.bos_token_id
    self.sep_id = t.sep_token_id if t.sep_token_id is not None else t.eos_token_id
    self.mask_id = t.mask_token_id
    if None in (self.pad_id, self.cls_id, self.sep_id):
      raise InputError(f"{path}: tokenizer lacks a pad, [CLS]/<s> or [SEP]/</s> token")

  def encode_batch(self, texts):
    return self.tok(list(texts), add_special_tokens=False)["input_ids"]

  def decode(self, ids):
    return self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(path: str) -> tokenizer_lib.Tokenizer:
  """A sentencepiece .model of this project, or a directory with an HF tokenizer."""
  if os.path.isfile(path):
    return tokenizer_lib.SentencePieceTokenizer(path)
  for name in ("spm.model", os.path.join("tokenizer", "spm.model")):
    if os.path.isfile(os.path.join(path, name)):
      return tokenizer_lib.SentencePieceTokenizer(os.path.join(path, name))
  if any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
    return HFTokenizer(path)
  raise InputError(f"{path}: no tokenizer found (spm.model, tokenizer/spm.model, tokenizer.json); "
                   f"pass --tokenizer")


def is_hf_dir(path: str) -> bool:
  return any(os.path.isfile(os.path.join(path, f)) for f in HF_WEIGHTS)


# ----------------------------------------------------------------------------- workdir
def read_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json that bepa-train wrote, over the defaults (so new keys have values)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise InputError(f"{path}: not found (is {workdir} a bepa-train workdir?)")
  try:
    with open(path) as f:
      saved = json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: not valid JSON ({e})") from None
  config = default_config.get_config()
  for section, values in saved.items():
    if section in config and isinstance(values, dict):
      for k, v in values.items():
        if k in config[section]:
          config[section][k] = tuple(map(tuple, v)) if k == "rules" else v
  return config


def _latest_step_dir(workdir: str) -> str | None:
  for root in (os.path.join(workdir, "checkpoints"), workdir):
    if not os.path.isdir(root):
      continue
    steps = [d for d in os.listdir(root) if d.isdigit() and os.path.isdir(os.path.join(root, d))]
    if steps:
      return os.path.join(root, max(steps, key=int))
  return None


def restore_params_numpy(workdir: str, step: int | None = None):
  """Params of the latest Orbax checkpoint under workdir, as host numpy (any device count).

  Used when bepa_jax.checkpoint offers no `load_params`: finds <workdir>/checkpoints/<step>/
  (or <workdir>/<step>/) as written by bepa_jax.checkpoint, restores the "params" subtree of
  the first Orbax pytree in it (the step dir or an item folder such as state/) as numpy,
  without a target and without reading the optimizer state.
  """
  import jax
  import orbax.checkpoint as ocp
  step_dir = _latest_step_dir(workdir) if step is None else os.path.join(workdir, "checkpoints",
                                                                         str(int(step)))
  if step_dir is None or not os.path.isdir(step_dir):
    raise InputError(f"{workdir}: no checkpoint found (looked for checkpoints/<step>/)")
  candidates = [step_dir] + sorted(os.path.join(step_dir, d) for d in os.listdir(step_dir))
  ckptr = ocp.PyTreeCheckpointer()
  for path in candidates:
    if not os.path.isfile(os.path.join(path, "_METADATA")):
      continue
    meta = ckptr.metadata(path)
    tree = getattr(getattr(meta, "item_metadata", meta), "tree", None) or meta
    as_numpy = lambda t: jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), t)
    if isinstance(tree, dict) and "params" in tree:  # a TrainState: skip the optimizer state
      item = {"params": jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree["params"])}
      args = ocp.args.PyTreeRestore(item=item, restore_args={"params": as_numpy(tree["params"])},
                                    partial_restore=True)
    else:
      args = ocp.args.PyTreeRestore(restore_args=as_numpy(tree))
    restored = ckptr.restore(path, args=args)
    node = restored
    while isinstance(node, dict) and "params" in node:
      node = node["params"]
    if isinstance(node, dict) and "embeddings" in node:
      return node
  raise InputError(f"{step_dir}: no Orbax item with model params in it")


def load_workdir(workdir: str, tokenizer_path: str | None = None) -> Loaded:
  config = read_workdir_config(workdir)
  if tokenizer_path:
    tokenizer = load_tokenizer(tokenizer_path)
  else:  # what training used: config.tokenizer.path (any kind) or the workdir's own model
    cached = os.path.join(workdir, "tokenizer", "spm.model")
    if not config.tokenizer.path and not os.path.isfile(cached):
      raise InputError(f"{cached}: not found and config.tokenizer.path is empty; pass --tokenizer")
    from bepa_jax import train
    tokenizer = train.load_tokenizer(config, workdir)
  model_cfg = EncoderConfig.from_config(config.model, vocab_size=tokenizer.vocab_size)
  params = None
  try:
    from bepa_jax.checkpoint import manager as ckpt_lib  # written alongside; optional here
    if hasattr(ckpt_lib, "load_params"):
      params = ckpt_lib.load_params(workdir)
  except ImportError:
    pass
  if params is None:
    params = restore_params_numpy(workdir)
  return Loaded(os.path.basename(os.path.normpath(workdir)), model_cfg, params, tokenizer,
                config.mesh, int(config.data.max_length))


def load_hf_dir(hf_dir: str, tokenizer_path: str | None = None) -> Loaded:
  from bepa_jax.hf import convert as hf
  try:
    model_cfg, params = hf.load_hf(hf_dir)
  except ValueError as e:  # HFFormatError: one line naming the file
    raise InputError(str(e)) from None
  tokenizer = load_tokenizer(tokenizer_path or hf_dir)
  pos = model_cfg.max_position_embeddings - (model_cfg.pad_token_id + 1
                                             if model_cfg.family == "xlmr" else 0)
  return Loaded(os.path.basename(os.path.normpath(hf_dir)), model_cfg, params, tokenizer,
                default_config.get_config().mesh, int(min(128, pos)))


def load(path: str, tokenizer_path: str | None = None) -> Loaded:
  """A workdir or an HF directory, told apart by the presence of HF weight files."""
  if not os.path.isdir(path):
    raise InputError(f"{path}: directory not found")
  return load_hf_dir(path, tokenizer_path) if is_hf_dir(path) else load_workdir(path,
                                                                               tokenizer_path)
