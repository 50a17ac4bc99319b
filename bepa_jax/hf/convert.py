"""HuggingFace interop: our Flax param tree <-> `BertForMaskedLM` / `XLMRobertaForMaskedLM`.

The exchange format is PyTorch-layout `model.safetensors` + `config.json` (hf/files.py reads and
writes them with numpy); the key map, as data, is in hf/keymaps.py. This module is the API:
`load_hf` / `save_hf`, config.json <-> EncoderConfig, and state dict <-> params.

"params" here is the inner tree `variables["params"]` = {embeddings, encoder, mlm_head}, boxed
(`nn.Partitioned`) or plain, numpy or jax arrays; a `{"params": ...}` wrapper is also accepted.

Input may also be an encoder-only checkpoint (`BertModel` / `XLMRobertaModel`, keys with or
without the base prefix; every sentence-transformers model): it has no MLM head, so the params
read from it have no `mlm_head` (the caller starts one fresh); a head that is only partly there
is an error. A tied decoder in an input must equal what it is tied to. Every problem raises a
one-line `HFFormatError` (bepa_jax.errors).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from bepa_jax.errors import HFFormatError
from bepa_jax.hf import files
from bepa_jax.hf import keymaps as km
from bepa_jax.model import EncoderConfig, encoder_params

# --------------------------------------------------------------------------------------------
# config.json <-> EncoderConfig

# HF config defaults (BertConfig / XLMRobertaConfig) for keys a config.json may omit.
_HF_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                    layer_norm_eps=1e-12, hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1, initializer_range=0.02)
# HF config key -> EncoderConfig field
_HF_TO_OURS = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                   num_hidden_layers="num_layers", num_attention_heads="num_heads",
                   intermediate_size="intermediate_size",
                   max_position_embeddings="max_position_embeddings",
                   type_vocab_size="type_vocab_size", layer_norm_eps="layer_norm_eps",
                   hidden_dropout_prob="hidden_dropout",
                   attention_probs_dropout_prob="attention_dropout",
                   initializer_range="initializer_range")
_FLOAT_KEYS = ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
               "initializer_range")
_EXACT_GELU = ("gelu", "gelu_python")  # both are the erf form our model implements


def hf_config_dict(cfg: EncoderConfig, *, dtype: str = "float32",
                   extra: Mapping[str, Any] | None = None) -> dict:
  """config.json for BertForMaskedLM (family bert) or XLMRobertaForMaskedLM (family xlmr).

  `dtype` is the dtype of the saved weights (save_hf writes float32); `extra` is merged last
  (e.g. bos/eos token ids from the tokenizer).
  """
  fam = km.family(cfg.family)
  _check_cfg(cfg)
  out = {
      "architectures": [fam.arch],
      "model_type": fam.model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "intermediate_size": cfg.intermediate_size,
      "hidden_act": "gelu",
      "hidden_dropout_prob": cfg.hidden_dropout,
      "attention_probs_dropout_prob": cfg.attention_dropout,
      "max_position_embeddings": cfg.max_position_embeddings,
      "type_vocab_size": cfg.type_vocab_size,
      "initializer_range": cfg.initializer_range,
      "layer_norm_eps": cfg.layer_norm_eps,
      "pad_token_id": cfg.pad_token_id,
      "position_embedding_type": "absolute",
      "is_decoder": False,
      "add_cross_attention": False,
      "tie_word_embeddings": True,
      "dtype": dtype,
  }
  if cfg.family == "xlmr":
    out.update(bos_token_id=0, eos_token_id=2)  # XLM-R / RoBERTa convention (<s>=0, </s>=2)
  if extra:
    out.update(extra)
  return out


def _check_supported(config_json: Mapping[str, Any]) -> str:
  """The family of an HF config.json; HFFormatError for what the encoder cannot run."""
  model_type = config_json.get("model_type")
  if model_type not in km.MODEL_TYPES:
    raise HFFormatError(f"unsupported model_type {model_type!r}: supported are "
                        f"{sorted(km.MODEL_TYPES)}")
  act = config_json.get("hidden_act", "gelu")
  if act not in _EXACT_GELU:
    raise HFFormatError(f"unsupported hidden_act {act!r}: the encoder implements exact GELU "
                        f"({' / '.join(_EXACT_GELU)})")
  pet = config_json.get("position_embedding_type") or "absolute"
  if pet != "absolute":
    raise HFFormatError(f"unsupported position_embedding_type {pet!r}: only 'absolute'")
  for flag in ("is_decoder", "add_cross_attention"):
    if config_json.get(flag):
      raise HFFormatError(f"unsupported config: {flag}=true (encoder-only models)")
  if config_json.get("tie_word_embeddings", True) is False:
    raise HFFormatError("unsupported config: tie_word_embeddings=false (the MLM decoder is tied "
                        "to the word embeddings)")
  return km.MODEL_TYPES[model_type]


def _number(key: str, value, kind):
  try:
    return kind(value)
  except (TypeError, ValueError):
    raise HFFormatError(f"config.json: {key}={value!r} is not a number") from None


def encoder_config_from_hf(config_json: Mapping[str, Any], **overrides) -> EncoderConfig:
  """EncoderConfig from an HF config.json dict; `overrides` (e.g. dtype, scan_layers) win."""
  family = _check_supported(config_json)
  kw: dict[str, Any] = {"family": family}
  for hf_key, ours in _HF_TO_OURS.items():
    kind = float if hf_key in _FLOAT_KEYS else int
    kw[ours] = _number(hf_key, config_json.get(hf_key, _HF_DEFAULTS[hf_key]), kind)
  pad = config_json.get("pad_token_id", km.FAMILIES[family].pad_default)
  if pad is None:
    if family == "xlmr":
      raise HFFormatError("config.json has pad_token_id=null: XLM-R positions need a pad id")
    pad = 0
  kw["pad_token_id"] = _number("pad_token_id", pad, int)
  fields = {f.name for f in dataclasses.fields(EncoderConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise HFFormatError(f"unknown EncoderConfig override(s) {unknown}")
  kw.update(overrides)
  cfg = EncoderConfig(**kw)
  _check_cfg(cfg)
  return cfg


def _check_cfg(cfg: EncoderConfig):
  if cfg.num_heads <= 0 or cfg.hidden_size % cfg.num_heads:
    raise HFFormatError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads "
                        f"{cfg.num_heads}")


# --------------------------------------------------------------------------------------------
# state dict <-> params

def _as_numpy(x) -> np.ndarray:
  if not isinstance(x, np.ndarray):
    try:
      import jax
      if isinstance(x, jax.Array):
        x = jax.device_get(x)
    except ImportError:  # pragma: no cover
      pass
  return np.asarray(x)


def params_to_hf_state_dict(params, cfg: EncoderConfig, *,
                            dtype: Any = None) -> dict[str, np.ndarray]:
  """Our params (scanned or not, boxed or not) -> HF MaskedLM state dict of numpy arrays.

  The tied decoder is not included (as HF saves it). Top-level modules other than
  embeddings/encoder/mlm_head (e.g. a contrastive projection) are not part of the HF model and
  are skipped; an unknown leaf inside those three is an error. `dtype` casts every tensor.
  """
  p = km.unstack_layers(km.to_plain(params))
  flat = km.flatten(encoder_params(p))
  rows = km.key_map(cfg)
  known = {o for o, _, _, _ in rows}
  n_layers = len([k for k in p.get("encoder", {}) if km.LAYER_RE.match(k)])
  if n_layers != cfg.num_layers:
    raise HFFormatError(f"params have {n_layers} encoder layers but config.num_layers is "
                        f"{cfg.num_layers}")
  extra = sorted(set(flat) - known)
  if extra:
    raise HFFormatError(f"params leaf {extra[0]!r} has no HF key ({len(extra)} unmapped: "
                        f"{extra[:5]})")
  if "mlm_head" not in p:
    raise HFFormatError("params have no mlm_head (was the model initialised without "
                        "mlm_positions?)")
  out = {}
  for ours, hf_key, hf_shape, kind in rows:
    if ours not in flat:
      raise HFFormatError(f"missing params leaf {ours!r} (for HF key {hf_key!r})")
    x = _as_numpy(flat[ours])
    want = kind.ours_shape(hf_shape, cfg)
    if tuple(x.shape) != tuple(want):
      raise HFFormatError(f"params leaf {ours!r}: expected shape {tuple(want)} from config, "
                          f"got {tuple(x.shape)}")
    y = np.ascontiguousarray(kind.to_hf(x))
    if dtype is not None:
      y = y.astype(dtype)
    out[hf_key] = y
  return out


def _rows_present(sd: Mapping[str, Any], cfg: EncoderConfig, info: dict | None) -> list:
  """The key-map rows `sd` must hold (no head rows for an encoder-only checkpoint); checks that
  none is missing and nothing unexpected is there."""
  rows = km.key_map(cfg)
  tied = km.family(cfg.family).tied
  head_keys = [h for _, h, _, _ in rows if km.is_head_key(h)]
  has_head = any(k in sd for k in head_keys) or any(k in sd for k in tied)
  if not has_head:  # encoder-only (BertModel, sentence-transformers): every encoder key needed
    rows = [r for r in rows if not km.is_head_key(r[1])]
  if info is not None:
    info.update(has_head=has_head, ignored=sorted(k for k in sd if km.IGNORED.match(k)))
  missing = [h for _, h, _, _ in rows if h not in sd]
  if missing:
    more = f": {missing[:5]}" if len(missing) > 1 else ""
    raise HFFormatError(f"missing key {missing[0]!r} in the HF state dict "
                        f"({len(missing)} missing{more})")
  used = {h for _, h, _, _ in rows}
  unexpected = sorted(k for k in sd if k not in used and k not in tied and not km.IGNORED.match(k))
  if unexpected:
    raise HFFormatError(f"unexpected key {unexpected[0]!r} in the HF state dict for family "
                        f"{cfg.family!r} ({len(unexpected)} unexpected: {unexpected[:5]})")
  return rows


def hf_state_dict_to_params(state_dict: Mapping[str, Any], cfg: EncoderConfig, *,
                            dtype: Any = np.float32, info: dict | None = None) -> dict:
  """HF MaskedLM or encoder-only state dict (numpy-convertible values) -> our plain params
  tree (inner dict, use as {'params': tree}); stacked if cfg.scan_layers. `dtype` (default
  float32, the model's param dtype; None keeps the checkpoint's) casts every tensor.

  Without any MLM head key the tree has no `mlm_head`. `info`, if given, receives has_head and
  ignored (the input keys dropped on purpose, e.g. the pooler) so that callers can say so.
  """
  fam = km.family(cfg.family)
  _check_cfg(cfg)
  sd = {km.normalize_key(k): v for k, v in state_dict.items()}
  bare = not any(k.startswith(fam.base + ".") for k in sd)
  if bare and "embeddings.word_embeddings.weight" in sd:
    # a bare BertModel / XLMRobertaModel state dict: add the prefix (its head will be missing)
    sd = {(k if km.is_head_key(k) else f"{fam.base}.{k}"): v for k, v in sd.items()}
  rows = _rows_present(sd, cfg, info)
  arrays = {}
  for _, hf_key, hf_shape, _ in rows:
    x = _as_numpy(sd[hf_key])
    if tuple(x.shape) != tuple(hf_shape):
      raise HFFormatError(f"key {hf_key!r}: expected shape {tuple(hf_shape)} from config, got "
                          f"{tuple(x.shape)}")
    arrays[hf_key] = x
  for k, target in km.tied_keys(fam).items():
    if k not in sd:
      continue
    x = _as_numpy(sd[k])
    if x.shape != arrays[target].shape or not np.array_equal(x, arrays[target]):
      raise HFFormatError(f"key {k!r} is not tied to {target!r} (untied decoders are not "
                          f"supported)")
  flat = {}
  for ours, hf_key, _, kind in rows:
    y = kind.from_hf(arrays[hf_key], cfg)
    if dtype is not None:
      y = y.astype(dtype)
    flat[ours] = np.ascontiguousarray(y)
  params = km.unflatten(flat)
  if cfg.scan_layers:
    params = km.stack_layers(params)
  return params


# --------------------------------------------------------------------------------------------
# directories

def save_hf(out_dir: str | os.PathLike, params, cfg: EncoderConfig, *,
            extra_config: Mapping[str, Any] | None = None) -> None:
  """Write config.json + model.safetensors (float32, PyTorch layout) loadable by
  `transformers.AutoModelForMaskedLM.from_pretrained(out_dir)`."""
  state = params_to_hf_state_dict(params, cfg, dtype=np.float32)
  config = hf_config_dict(cfg, dtype="float32", extra=extra_config)
  os.makedirs(out_dir, exist_ok=True)
  files.write_safetensors(os.path.join(out_dir, files.SAFE_WEIGHTS), state)
  files.write_config(os.path.join(out_dir, files.CONFIG_NAME), config)


def load_hf(hf_dir: str | os.PathLike, *, allow_pickle: bool = False, info: dict | None = None,
            pickle_flag: str | None = None, **overrides) -> tuple[EncoderConfig, dict]:
  """Read an HF BertForMaskedLM / XLMRobertaForMaskedLM directory -> (EncoderConfig, params).

  Encoder-only directories (BertModel, sentence-transformers) give params without mlm_head.
  Weights come from model.safetensors (or a sharded model.safetensors.index.json);
  pytorch_model.bin is a pickle and is read (with torch.load(weights_only=True)) only when
  allow_pickle=True (`pickle_flag`: the caller's flag for it, named in the refusal).
  `overrides` go to `encoder_config_from_hf` (e.g. dtype, scan_layers).
  `info` receives model_dir, has_head and ignored (see `hf_state_dict_to_params`).
  """
  hf_dir = os.fspath(hf_dir)
  if not os.path.isdir(hf_dir):
    raise HFFormatError(f"HF model directory {hf_dir!r} does not exist")
  hf_dir = files.resolve_model_dir(hf_dir)
  if info is not None:
    info["model_dir"] = hf_dir
  cfg_path = os.path.join(hf_dir, files.CONFIG_NAME)
  if not os.path.isfile(cfg_path):
    raise HFFormatError(f"no {files.CONFIG_NAME} in {hf_dir!r}")
  cfg = encoder_config_from_hf(files.read_config(cfg_path), **overrides)
  state = files.read_weights(hf_dir, allow_pickle=allow_pickle, pickle_flag=pickle_flag)
  return cfg, hf_state_dict_to_params(state, cfg, info=info)
