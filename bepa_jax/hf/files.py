"""The files of an HF model directory: config.json, model.safetensors (or a sharded index), the
pickle-only pytorch_model.bin (read with torch.load(weights_only=True), and only when asked), and
the layout of a sentence-transformers model (modules.json; its encoder may be a subfolder).

Weights are read and written with numpy; torch is needed only for pytorch_model.bin. Every
problem raises a one-line HFFormatError naming the file.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from bepa_jax.errors import HFFormatError, one_line

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
WEIGHT_FILES = (SAFE_WEIGHTS, SAFE_INDEX, PICKLE_WEIGHTS)
ST_MODULES = "modules.json"
# sentence-transformers module classes that wrap an HF encoder (the last part of "type";
# Transformer since v1, BERT / XLMRoBERTa in the oldest saved models)
_ST_ENCODER_CLASSES = ("Transformer", "BERT", "RoBERTa", "XLMRoBERTa")
# sentence-transformers files that go along with an export: at the top / beside the encoder
ST_CONFIG = "config_sentence_transformers.json"
ST_TRANSFORMER_CONFIG = "sentence_bert_config.json"
ST_ROOT_FILES = (ST_CONFIG,)
ST_ENCODER_FILES = (ST_TRANSFORMER_CONFIG,)
ST_POOLINGS = ("cls", "mean")  # the embeddings bepa-eval reports (bepa_jax/eval/embed.py)
# the module types in the classic spelling, which every sentence-transformers since v2 reads
_ST_TYPES = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
             "sentence_transformers.models.Normalize")


# --------------------------------------------------------------------------------------------
# config.json

def read_config(path: str) -> dict:
  """An HF config.json as a dict."""
  try:
    with open(path) as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise HFFormatError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(out, dict):
    raise HFFormatError(f"{path} is not a JSON object")
  return out


def write_config(path: str, config: Mapping[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")


# --------------------------------------------------------------------------------------------
# sentence-transformers

def sentence_transformers_modules(path: str | os.PathLike) -> list[dict] | None:
  """The module list of a sentence-transformers directory (its modules.json), else None."""
  modules = os.path.join(os.fspath(path), ST_MODULES)
  if not os.path.isfile(modules):
    return None
  try:
    with open(modules) as f:
      out = json.load(f)
  except json.JSONDecodeError as e:
    raise HFFormatError(f"{modules} is not valid JSON: {e}") from e
  if not isinstance(out, list) or not all(isinstance(m, Mapping) for m in out):
    raise HFFormatError(f"{modules} is not a list of modules")
  return out


def st_encoder_module(modules: list[dict]) -> dict | None:
  """The entry of `modules` that holds the HF encoder (its "path" is relative, "" = top)."""
  for m in modules:
    if str(m.get("type", "")).rsplit(".", 1)[-1] in _ST_ENCODER_CLASSES:
      return m
  return None


def resolve_model_dir(path: str | os.PathLike) -> str:
  """The directory with the encoder's config.json and weights: `path`, or for a
  sentence-transformers model the folder its modules.json names for the Transformer module
  (top level or e.g. 0_Transformer/)."""
  path = os.fspath(path)
  modules = sentence_transformers_modules(path)
  if modules is None:
    return path
  module = st_encoder_module(modules)
  if module is None:
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
      return path
    raise HFFormatError(f"{os.path.join(path, ST_MODULES)} names no Transformer module (types: "
                        f"{[m.get('type') for m in modules]})")
  sub = str(module.get("path") or "")
  if os.path.isabs(sub) or ".." in sub.split("/"):
    raise HFFormatError(f"{os.path.join(path, ST_MODULES)}: module path {sub!r} is outside "
                        f"{path!r}")
  return os.path.join(path, sub) if sub else path


def copy_sentence_transformers(st_dir: str, out_dir: str) -> bool:
  """When the run started from a sentence-transformers model, its modules (pooling, normalize,
  ...) go along, with the Transformer module at the top of `out_dir` (where the exported
  encoder is), so SentenceTransformer(out_dir) computes the same kind of embedding. False when
  `st_dir` is not a sentence-transformers model."""
  modules = sentence_transformers_modules(st_dir)
  encoder = st_encoder_module(modules) if modules else None
  if encoder is None:
    return False
  enc_dir = resolve_model_dir(st_dir)
  out_modules = []
  for m in modules:
    sub = str(m.get("path") or "")
    if m is encoder:
      m = dict(m, path="")
    elif sub and os.path.isdir(os.path.join(st_dir, sub)):  # e.g. 2_Normalize may have no folder
      shutil.copytree(os.path.join(st_dir, sub), os.path.join(out_dir, sub))
    out_modules.append(m)
  _write_json(os.path.join(out_dir, ST_MODULES), out_modules)
  for name, src in [(n, st_dir) for n in ST_ROOT_FILES] + [(n, enc_dir) for n in ST_ENCODER_FILES]:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
  return True


def write_sentence_transformers(out_dir: str, *, dim: int, max_seq_length: int,
                                pooling: str = "cls") -> None:
  """The sentence-transformers layout around the HF encoder at the top of `out_dir`:
  Transformer -> Pooling ([CLS] or mean over real tokens) -> Normalize, so that
  SentenceTransformer(out_dir).encode gives bepa-eval's L2-normalised embeddings."""
  if pooling not in ST_POOLINGS:
    raise HFFormatError(f"pooling {pooling!r} is not one of {', '.join(ST_POOLINGS)}")
  paths = ("", "1_Pooling", "2_Normalize")  # Normalize has no files: no folder (as on the Hub)
  _write_json(os.path.join(out_dir, ST_MODULES),
              [{"idx": i, "name": str(i), "path": p, "type": t}
               for i, (p, t) in enumerate(zip(paths, _ST_TYPES))])
  _write_json(os.path.join(out_dir, ST_TRANSFORMER_CONFIG),
              {"max_seq_length": int(max_seq_length), "do_lower_case": False})
  _write_json(os.path.join(out_dir, ST_CONFIG),
              {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})
  os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
  _write_json(os.path.join(out_dir, "1_Pooling", CONFIG_NAME),
              {"word_embedding_dimension": int(dim), "pooling_mode_cls_token": pooling == "cls",
               "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False})


def st_max_seq_length(model_dir: str) -> int | None:
  """max_seq_length of the sentence_bert_config.json beside an encoder, else None."""
  path = os.path.join(model_dir, ST_TRANSFORMER_CONFIG)
  if not os.path.isfile(path):
    return None
  value = read_config(path).get("max_seq_length")
  return int(value) if isinstance(value, int) and value > 0 else None


def st_pooling(st_dir: str) -> str | None:
  """The pooling of a sentence-transformers directory ("cls", "mean", ...), else None."""
  modules = sentence_transformers_modules(st_dir) or []
  for m in modules:
    if str(m.get("type", "")).rsplit(".", 1)[-1] == "Pooling":
      path = os.path.join(st_dir, str(m.get("path") or ""), CONFIG_NAME)
      if not os.path.isfile(path):
        return None
      cfg = read_config(path)
      if isinstance(cfg.get("pooling_mode"), str):  # sentence-transformers >= 6
        return cfg["pooling_mode"]
      for key, name in (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                        ("pooling_mode_max_tokens", "max"),
                        ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len")):
        if cfg.get(key):
          return name
  return None


# --------------------------------------------------------------------------------------------
# weights

def write_safetensors(path: str, state: Mapping[str, np.ndarray]) -> None:
  """PyTorch-layout safetensors (metadata format=pt, as transformers expects)."""
  from safetensors.numpy import save_file
  save_file(dict(state), path, metadata={"format": "pt"})


def check_safetensors(path: str) -> None:
  """Raises HFFormatError naming `path` if it is cut short or has no valid header.

  Reads only the header, so a cut-off copy (an interrupted download or scp) is refused before
  any weight is loaded and before a run writes anything.
  """
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      prefix = f.read(8)
      n = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
      header = f.read(n) if 8 + n <= size else b""
  except OSError as e:
    raise HFFormatError(f"{path}: cannot be read ({e.strerror or e})") from None
  if len(prefix) < 8 or 8 + n > size:
    raise HFFormatError(f"{path}: truncated or not a safetensors file ({size} bytes, too short "
                        f"for its header)")
  try:
    entries = json.loads(header.decode("utf-8"))
    end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"),
              default=0)
  except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
    raise HFFormatError(f"{path}: corrupt safetensors file (unreadable header)") from None
  if 8 + n + end > size:
    raise HFFormatError(f"{path}: truncated ({size} of {8 + n + end} bytes); copy or export it "
                        f"again")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a safetensors file as numpy (bfloat16 as float32)."""
  from safetensors import safe_open
  check_safetensors(path)
  out = {}
  try:
    # framework="np" also reads bfloat16 (as ml_dtypes.bfloat16), unlike safetensors.numpy.load_file
    with safe_open(path, framework="np") as f:
      for k in f.keys():
        x = f.get_tensor(k)
        if x.dtype.name == "bfloat16":
          x = x.astype(np.float32)
        out[k] = x
  except Exception as e:  # noqa: BLE001 -- SafetensorError (not a ValueError): one line
    raise HFFormatError(f"{path}: corrupt safetensors file ({one_line(e)})") from None
  return out


def read_pickle(path: str) -> dict[str, np.ndarray]:
  """A pytorch_model.bin state dict as numpy, loaded with weights_only=True (no code runs)."""
  try:
    import torch
  except ImportError as e:
    raise HFFormatError(f"reading {path} needs torch, which is not installed") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 -- a cut-off or foreign file: one line naming it
    raise HFFormatError(f"{path}: corrupt or truncated ({one_line(e)})") from None
  if not isinstance(sd, Mapping):
    raise HFFormatError(f"{path} does not hold a state dict (got {type(sd).__name__})")
  out = {}
  for k, v in sd.items():
    v = v.detach().cpu()
    if v.dtype == torch.bfloat16:
      v = v.float()
    out[k] = v.numpy()
  return out


def _index_shards(hf_dir: str, index: str) -> list[tuple[str, str]]:
  try:
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
  except (ValueError, KeyError, TypeError, AttributeError):
    raise HFFormatError(f"{index}: not a valid safetensors index (no weight_map)") from None
  files = []
  for shard in shards:
    shard_path = os.path.join(hf_dir, shard)
    if not os.path.isfile(shard_path):
      raise HFFormatError(f"{shard_path}: weights file missing (named in {SAFE_INDEX})")
    files.append((shard_path, "safetensors"))
  return files


# How a user lets pickle weights be read: the training config's key (bepa-train, bepa-ckpt
# import); bepa-eval and bepa-transfer read no pickle, so they point at an import.
PICKLE_FLAG = "--config.init.allow_pickle=True"


def weight_files(hf_dir: str, *, allow_pickle: bool = False,
                 pickle_flag: str | None = None) -> list[tuple[str, str]]:
  """[(path, "safetensors" | "pickle")] of the weights in `hf_dir`; HFFormatError naming the
  missing file (a missing weights file is never reported as some other problem), or for a
  pickle-only dir the caller's `pickle_flag` that allows it (None: the caller has none)."""
  safe = os.path.join(hf_dir, SAFE_WEIGHTS)
  index = os.path.join(hf_dir, SAFE_INDEX)
  pickle = os.path.join(hf_dir, PICKLE_WEIGHTS)
  if os.path.isfile(safe):
    return [(safe, "safetensors")]
  if os.path.isfile(index):
    return _index_shards(hf_dir, index)
  if os.path.isfile(pickle):
    if not allow_pickle:
      how = (f"pass {pickle_flag}" if pickle_flag else
             f"import it: bepa-ckpt import {hf_dir} WORKDIR {PICKLE_FLAG}, then use WORKDIR")
      raise HFFormatError(f"{hf_dir!r} has only {PICKLE_WEIGHTS}, a pickle that can run code; "
                          f"convert it to {SAFE_WEIGHTS} or, if you trust it, {how}")
    return [(pickle, "pickle")]
  raise HFFormatError(f"{safe}: weights file missing (no {SAFE_INDEX} or {PICKLE_WEIGHTS} "
                      f"either)")


def check_weights(hf_dir: str, *, allow_pickle: bool = False,
                  pickle_flag: str | None = None) -> None:
  """The weight files of `hf_dir` exist and are whole (headers only; cheap)."""
  for path, kind in weight_files(hf_dir, allow_pickle=allow_pickle, pickle_flag=pickle_flag):
    if kind == "safetensors":
      check_safetensors(path)


def read_weights(hf_dir: str, *, allow_pickle: bool = False,
                 pickle_flag: str | None = None) -> dict[str, np.ndarray]:
  """The HF state dict of `hf_dir` (every shard), as numpy."""
  state = {}
  for path, kind in weight_files(hf_dir, allow_pickle=allow_pickle, pickle_flag=pickle_flag):
    state.update(read_pickle(path) if kind == "pickle" else read_safetensors(path))
  return state
