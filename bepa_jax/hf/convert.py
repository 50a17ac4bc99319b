"""HuggingFace interop: our Flax param tree <-> `BertForMaskedLM` / `XLMRobertaForMaskedLM`.

The exchange format is PyTorch-layout `model.safetensors` + `config.json`, read and written with
numpy only (torch is needed only for the opt-in `pytorch_model.bin` path and for tests).

"params" here is the inner tree `variables["params"]` = {embeddings, encoder, mlm_head}, boxed
(`nn.Partitioned`) or plain, numpy or jax arrays; a `{"params": ...}` wrapper is also accepted.
Unscanned layers live at encoder/layer_{i}/..., scanned ones at encoder/layers/... with a leading
[num_layers] axis (`stack_layers` / `unstack_layers` convert).

Key map (HF key = <base>.<suffix>, base `bert` / `roberta`; shapes in HF layout; T = transpose;
nh heads, hd head_dim; (H,nh,hd)->T = merge the head axes, then transpose). The same map, as
data, is EMBEDDING_MAP / LAYER_MAP / HEAD_MAP below:

  ours (under params/)             HF suffix                                  HF shape  transform
  embeddings/
    word_embeddings/embedding      embeddings.word_embeddings.weight          [V, H]    copy
    position_embeddings/embedding  embeddings.position_embeddings.weight      [P, H]    copy
    token_type_embeddings/embedding  embeddings.token_type_embeddings.weight  [T, H]    copy
    LayerNorm/{scale,bias}         embeddings.LayerNorm.{weight,bias}         [H]       copy
  encoder/layer_{i}/               encoder.layer.{i}.
    attention/{q,k,v}/kernel       attention.self.{query,key,value}.weight    [H, H]    (H,nh,hd)->T
    attention/{q,k,v}/bias         attention.self.{query,key,value}.bias      [H]       [nh,hd]->[H]
    attention/output/kernel        attention.output.dense.weight              [H, H]    (nh,hd,H)->T
    attention/output/bias          attention.output.dense.bias                [H]       copy
    attention_LayerNorm/*          attention.output.LayerNorm.{weight,bias}   [H]       copy
    intermediate/{kernel,bias}     intermediate.dense.{weight,bias}           [I, H]    T / copy
    output/{kernel,bias}           output.dense.{weight,bias}                 [H, I]    T / copy
    output_LayerNorm/*             output.LayerNorm.{weight,bias}             [H]       copy
  MLM head, full HF keys (bert | xlmr):
    mlm_head/dense/{kernel,bias}   cls.predictions.transform.dense.* | lm_head.dense.*    T / copy
    mlm_head/LayerNorm/*           cls.predictions.transform.LayerNorm.* | lm_head.layer_norm.*
    mlm_head/bias                  cls.predictions.bias | lm_head.bias        [V]       copy
  (q,k,v = query,key,value; LayerNorm scale -> weight, bias -> bias)

The decoder (`cls.predictions.decoder.*` / `lm_head.decoder.*`) is tied to the word embeddings and
the head bias, so it is not written; when present in an input it must equal what it is tied to.
`pooler.*`, `cls.seq_relationship.*` and the `embeddings.{position_ids,token_type_ids}` buffers
are ignored on input. Every other problem raises a one-line `HFFormatError`.

Input may also be an encoder-only checkpoint (`BertModel` / `XLMRobertaModel`, keys with or
without the base prefix; every sentence-transformers model): it has no MLM head, so the params
read from it have no `mlm_head` (the caller starts one fresh); a head that is only partly there
is an error. A sentence-transformers directory is read from the folder its modules.json names
for the Transformer module (`resolve_model_dir`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Mapping

import numpy as np

from bepa_jax.model import EncoderConfig, encoder_params


class HFFormatError(ValueError):
  """An HF checkpoint / config that cannot be converted. The message is one line."""


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --------------------------------------------------------------------------------------------
# families and configs

# family -> model_type written, HF base-model prefix, MaskedLM architecture
_FAMILIES = {
    "bert": dict(model_type="bert", base="bert", arch="BertForMaskedLM"),
    "xlmr": dict(model_type="xlm-roberta", base="roberta", arch="XLMRobertaForMaskedLM"),
}
# model_type read -> family (RoBERTa has the XLM-R architecture and key names)
_MODEL_TYPES = {"bert": "bert", "xlm-roberta": "xlmr", "roberta": "xlmr"}

# HF config defaults (BertConfig / XLMRobertaConfig) for keys a config.json may omit.
_HF_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2,
                    layer_norm_eps=1e-12, hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1, initializer_range=0.02)
_HF_PAD_DEFAULT = {"bert": 0, "xlmr": 1}
# HF config key -> EncoderConfig field
_HF_TO_OURS = dict(vocab_size="vocab_size", hidden_size="hidden_size",
                   num_hidden_layers="num_layers", num_attention_heads="num_heads",
                   intermediate_size="intermediate_size",
                   max_position_embeddings="max_position_embeddings",
                   type_vocab_size="type_vocab_size", layer_norm_eps="layer_norm_eps",
                   hidden_dropout_prob="hidden_dropout",
                   attention_probs_dropout_prob="attention_dropout",
                   initializer_range="initializer_range")
_EXACT_GELU = ("gelu", "gelu_python")  # both are the erf form our model implements


def _family_info(cfg: EncoderConfig) -> dict:
  if cfg.family not in _FAMILIES:
    raise HFFormatError(f"unsupported family {cfg.family!r}: supported are {sorted(_FAMILIES)}")
  return _FAMILIES[cfg.family]


def hf_config_dict(cfg: EncoderConfig, *, dtype: str = "float32",
                   extra: Mapping[str, Any] | None = None) -> dict:
  """config.json for BertForMaskedLM (family bert) or XLMRobertaForMaskedLM (family xlmr).

  `dtype` is the dtype of the saved weights (save_hf writes float32); `extra` is merged last
  (e.g. bos/eos token ids from the tokenizer).
  """
  info = _family_info(cfg)
  _check_cfg(cfg)
  out = {
      "architectures": [info["arch"]],
      "model_type": info["model_type"],
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


def encoder_config_from_hf(config_json: Mapping[str, Any], **overrides) -> EncoderConfig:
  """EncoderConfig from an HF config.json dict; `overrides` (e.g. dtype, scan_layers) win."""
  model_type = config_json.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise HFFormatError(f"unsupported model_type {model_type!r}: supported are "
                        f"{sorted(_MODEL_TYPES)}")
  family = _MODEL_TYPES[model_type]
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
  kw: dict[str, Any] = {"family": family}
  for hf_key, ours in _HF_TO_OURS.items():
    kw[ours] = config_json.get(hf_key, _HF_DEFAULTS[hf_key])
  pad = config_json.get("pad_token_id", _HF_PAD_DEFAULT[family])
  if pad is None:
    if family == "xlmr":
      raise HFFormatError("config.json has pad_token_id=null: XLM-R positions need a pad id")
    pad = 0
  kw["pad_token_id"] = pad
  for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "pad_token_id"):
    kw[k] = int(kw[k])
  for k in ("layer_norm_eps", "hidden_dropout", "attention_dropout", "initializer_range"):
    kw[k] = float(kw[k])
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
# the key map

@dataclasses.dataclass(frozen=True)
class _Kind:
  """How one tensor moves between layouts: ours = from_hf(hf), hf = to_hf(ours)."""
  name: str
  to_hf: Callable[[np.ndarray], np.ndarray]
  from_hf: Callable[[np.ndarray, EncoderConfig], np.ndarray]
  ours_shape: Callable[[tuple, EncoderConfig], tuple]


def _qkv_from_hf(w, cfg):  # [nh*hd, H] -> [H, nh, hd]
  return w.T.reshape(cfg.hidden_size, cfg.num_heads, cfg.head_dim)


def _attn_out_from_hf(w, cfg):  # [H, nh*hd] -> [nh, hd, H]
  return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


COPY = _Kind("copy", lambda x: x, lambda x, cfg: x, lambda s, cfg: s)
DENSE = _Kind("transpose", lambda x: x.T, lambda x, cfg: x.T, lambda s, cfg: s[::-1])
QKV_KERNEL = _Kind("qkv_kernel", lambda x: x.reshape(x.shape[0], -1).T, _qkv_from_hf,
                   lambda s, cfg: (cfg.hidden_size, cfg.num_heads, cfg.head_dim))
QKV_BIAS = _Kind("qkv_bias", lambda x: x.reshape(-1),
                 lambda x, cfg: x.reshape(cfg.num_heads, cfg.head_dim),
                 lambda s, cfg: (cfg.num_heads, cfg.head_dim))
ATTN_OUT_KERNEL = _Kind("attn_out_kernel", lambda x: x.reshape(-1, x.shape[-1]).T,
                        _attn_out_from_hf,
                        lambda s, cfg: (cfg.num_heads, cfg.head_dim, cfg.hidden_size))

# (ours, HF suffix, HF shape in symbols, kind). Symbols: V vocab, P positions, T token types,
# H hidden, I intermediate.
EMBEDDING_MAP = [
    ("embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", "VH", COPY),
    ("embeddings/position_embeddings/embedding", "embeddings.position_embeddings.weight", "PH",
     COPY),
    ("embeddings/token_type_embeddings/embedding", "embeddings.token_type_embeddings.weight", "TH",
     COPY),
    ("embeddings/LayerNorm/scale", "embeddings.LayerNorm.weight", "H", COPY),
    ("embeddings/LayerNorm/bias", "embeddings.LayerNorm.bias", "H", COPY),
]
# relative to encoder/layer_{i}/  <->  encoder.layer.{i}.
LAYER_MAP = [
    ("attention/query/kernel", "attention.self.query.weight", "HH", QKV_KERNEL),
    ("attention/query/bias", "attention.self.query.bias", "H", QKV_BIAS),
    ("attention/key/kernel", "attention.self.key.weight", "HH", QKV_KERNEL),
    ("attention/key/bias", "attention.self.key.bias", "H", QKV_BIAS),
    ("attention/value/kernel", "attention.self.value.weight", "HH", QKV_KERNEL),
    ("attention/value/bias", "attention.self.value.bias", "H", QKV_BIAS),
    ("attention/output/kernel", "attention.output.dense.weight", "HH", ATTN_OUT_KERNEL),
    ("attention/output/bias", "attention.output.dense.bias", "H", COPY),
    ("attention_LayerNorm/scale", "attention.output.LayerNorm.weight", "H", COPY),
    ("attention_LayerNorm/bias", "attention.output.LayerNorm.bias", "H", COPY),
    ("intermediate/kernel", "intermediate.dense.weight", "IH", DENSE),
    ("intermediate/bias", "intermediate.dense.bias", "I", COPY),
    ("output/kernel", "output.dense.weight", "HI", DENSE),
    ("output/bias", "output.dense.bias", "H", COPY),
    ("output_LayerNorm/scale", "output.LayerNorm.weight", "H", COPY),
    ("output_LayerNorm/bias", "output.LayerNorm.bias", "H", COPY),
]
# full HF keys (no base prefix)
HEAD_MAP = {
    "bert": [
        ("mlm_head/dense/kernel", "cls.predictions.transform.dense.weight", "HH", DENSE),
        ("mlm_head/dense/bias", "cls.predictions.transform.dense.bias", "H", COPY),
        ("mlm_head/LayerNorm/scale", "cls.predictions.transform.LayerNorm.weight", "H", COPY),
        ("mlm_head/LayerNorm/bias", "cls.predictions.transform.LayerNorm.bias", "H", COPY),
        ("mlm_head/bias", "cls.predictions.bias", "V", COPY),
    ],
    "xlmr": [
        ("mlm_head/dense/kernel", "lm_head.dense.weight", "HH", DENSE),
        ("mlm_head/dense/bias", "lm_head.dense.bias", "H", COPY),
        ("mlm_head/LayerNorm/scale", "lm_head.layer_norm.weight", "H", COPY),
        ("mlm_head/LayerNorm/bias", "lm_head.layer_norm.bias", "H", COPY),
        ("mlm_head/bias", "lm_head.bias", "V", COPY),
    ],
}
# tied decoder keys: HF key -> the HF key it is tied to (suffix of word embeddings / head bias)
_TIED = {
    "bert": {"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
             "cls.predictions.decoder.bias": "cls.predictions.bias"},
    "xlmr": {"lm_head.decoder.weight": "embeddings.word_embeddings.weight",
             "lm_head.decoder.bias": "lm_head.bias"},
}
_IGNORED = re.compile(r"^(?:(?:bert|roberta)\.)?(?:pooler\..*|embeddings\.position_ids"
                      r"|embeddings\.token_type_ids)$|^cls\.seq_relationship\..*$")


def _hf_shape(symbols: str, cfg: EncoderConfig) -> tuple:
  dims = dict(V=cfg.vocab_size, P=cfg.max_position_embeddings, T=cfg.type_vocab_size,
              H=cfg.hidden_size, I=cfg.intermediate_size)
  return tuple(dims[s] for s in symbols)


def key_map(cfg: EncoderConfig) -> list[tuple[str, str, tuple, _Kind]]:
  """[(our path under params/ (unscanned), HF key, HF shape, kind)] for this config."""
  info = _family_info(cfg)
  base = info["base"]
  rows = [(o, f"{base}.{h}", _hf_shape(s, cfg), k) for o, h, s, k in EMBEDDING_MAP]
  for i in range(cfg.num_layers):
    rows += [(f"encoder/layer_{i}/{o}", f"{base}.encoder.layer.{i}.{h}", _hf_shape(s, cfg), k)
             for o, h, s, k in LAYER_MAP]
  rows += [(o, h, _hf_shape(s, cfg), k) for o, h, s, k in HEAD_MAP[cfg.family]]
  return rows


# --------------------------------------------------------------------------------------------
# tree helpers

def _to_plain(tree):
  """Unbox nn.Partitioned, unfreeze, unwrap {'params': ...}."""
  from flax.core import unfreeze
  from flax.linen import meta
  tree = unfreeze(meta.unbox(tree))
  if isinstance(tree, Mapping) and set(tree) == {"params"}:
    tree = tree["params"]
  return tree


def _as_numpy(x) -> np.ndarray:
  if not isinstance(x, np.ndarray):
    try:
      import jax
      if isinstance(x, jax.Array):
        x = jax.device_get(x)
    except ImportError:  # pragma: no cover
      pass
  return np.asarray(x)


def _is_jax(x) -> bool:
  try:
    import jax
    return isinstance(x, jax.Array)
  except ImportError:  # pragma: no cover
    return False


def _tree_map(fn, *trees):
  first = trees[0]
  if isinstance(first, Mapping):
    return {k: _tree_map(fn, *[t[k] for t in trees]) for k in first}
  return fn(*trees)


_LAYER_RE = re.compile(r"^layer_(\d+)$")


def stack_layers(params):
  """encoder/layer_{i}/... -> encoder/layers/... with a leading [num_layers] axis.

  Accepts boxed or plain params (with or without a {'params': ...} wrapper, kept on output);
  returns plain arrays (jax arrays stay jax, numpy stays numpy). Already-stacked trees pass.
  """
  wrapped = isinstance(params, Mapping) and set(params) == {"params"}
  p = _to_plain(params)
  enc = dict(p["encoder"])
  idx = sorted(int(m.group(1)) for k in enc if (m := _LAYER_RE.match(k)))
  if not idx:
    return {"params": p} if wrapped else p
  if idx != list(range(len(idx))):
    raise HFFormatError(f"encoder layers are not layer_0..layer_{len(idx) - 1}: found {idx}")
  layers = [enc.pop(f"layer_{i}") for i in idx]
  if "layers" in enc:
    raise HFFormatError("encoder has both layer_{i} and scanned 'layers' params")

  def stack(*xs):
    if any(_is_jax(x) for x in xs):
      import jax.numpy as jnp
      return jnp.stack(xs)
    return np.stack(xs)

  enc["layers"] = _tree_map(stack, *layers)
  out = dict(p, encoder=enc)
  return {"params": out} if wrapped else out


def unstack_layers(params):
  """encoder/layers/... (leading [num_layers] axis) -> encoder/layer_{i}/...; inverse of
  `stack_layers`. Unscanned trees pass through (unboxed)."""
  wrapped = isinstance(params, Mapping) and set(params) == {"params"}
  p = _to_plain(params)
  enc = dict(p["encoder"])
  if "layers" not in enc:
    return {"params": p} if wrapped else p
  layers = enc.pop("layers")
  leaves: list = []
  _tree_map(leaves.append, layers)
  n = {x.shape[0] for x in leaves}
  if len(n) != 1:
    raise HFFormatError(f"scanned encoder/layers leaves disagree on the layer axis: {sorted(n)}")
  n = n.pop()
  for i in range(n):
    enc[f"layer_{i}"] = _tree_map(lambda x, i=i: x[i], layers)
  out = dict(p, encoder=enc)
  return {"params": out} if wrapped else out


def _flatten(tree, prefix="") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, path + "/"))
    else:
      out[path] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = v
  return out


# --------------------------------------------------------------------------------------------
# conversion

def params_to_hf_state_dict(params, cfg: EncoderConfig, *,
                            dtype: Any = None) -> dict[str, np.ndarray]:
  """Our params (scanned or not, boxed or not) -> HF MaskedLM state dict of numpy arrays.

  The tied decoder is not included (as HF saves it). Top-level modules other than
  embeddings/encoder/mlm_head (e.g. a contrastive projection) are not part of the HF model and
  are skipped; an unknown leaf inside those three is an error. `dtype` casts every tensor.
  """
  p = unstack_layers(_to_plain(params))
  flat = _flatten(encoder_params(p))
  rows = key_map(cfg)
  known = {o for o, _, _, _ in rows}
  n_layers = len([k for k in p.get("encoder", {}) if _LAYER_RE.match(k)])
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


def _is_head_key(hf_key: str) -> bool:
  return hf_key.startswith(("cls.", "lm_head."))


def _normalize_key(k: str) -> str:
  # very old (TF-converted) checkpoints name LayerNorm params gamma / beta
  if k.endswith(".gamma"):
    return k[:-len(".gamma")] + ".weight"
  if k.endswith(".beta"):
    return k[:-len(".beta")] + ".bias"
  return k


def hf_state_dict_to_params(state_dict: Mapping[str, Any], cfg: EncoderConfig, *,
                            dtype: Any = np.float32, info: dict | None = None) -> dict:
  """HF MaskedLM or encoder-only state dict (numpy-convertible values) -> our plain params
  tree (inner dict, use as {'params': tree}); stacked if cfg.scan_layers. `dtype` (default
  float32, the model's param dtype; None keeps the checkpoint's) casts every tensor.

  Without any MLM head key the tree has no `mlm_head`. `info`, if given, receives has_head and
  ignored (the input keys dropped on purpose, e.g. the pooler) so that callers can say so.
  """
  base = _family_info(cfg)["base"]
  _check_cfg(cfg)
  sd = {_normalize_key(k): v for k, v in state_dict.items()}
  if not any(k.startswith(base + ".") for k in sd) and "embeddings.word_embeddings.weight" in sd:
    # a bare BertModel / XLMRobertaModel state dict: add the prefix (its head will be missing)
    sd = {(k if k.startswith(("cls.", "lm_head.")) else f"{base}.{k}"): v for k, v in sd.items()}
  rows = key_map(cfg)
  tied = _TIED[cfg.family]
  head_keys = [h for _, h, _, _ in rows if _is_head_key(h)]
  has_head = any(k in sd for k in head_keys) or any(k in sd for k in tied)
  if not has_head:  # encoder-only (BertModel, sentence-transformers): every encoder key needed
    rows = [r for r in rows if not _is_head_key(r[1])]
  if info is not None:
    info.update(has_head=has_head, ignored=sorted(k for k in sd if _IGNORED.match(k)))
  missing = [h for _, h, _, _ in rows if h not in sd]
  if missing:
    more = f": {missing[:5]}" if len(missing) > 1 else ""
    raise HFFormatError(f"missing key {missing[0]!r} in the HF state dict "
                        f"({len(missing)} missing{more})")
  used = {h for _, h, _, _ in rows}
  unexpected = sorted(k for k in sd if k not in used and k not in tied and not _IGNORED.match(k))
  if unexpected:
    raise HFFormatError(f"unexpected key {unexpected[0]!r} in the HF state dict for family "
                        f"{cfg.family!r} ({len(unexpected)} unexpected: {unexpected[:5]})")
  arrays = {}
  for _, hf_key, hf_shape, _ in rows:
    x = _as_numpy(sd[hf_key])
    if tuple(x.shape) != tuple(hf_shape):
      raise HFFormatError(f"key {hf_key!r}: expected shape {tuple(hf_shape)} from config, got "
                          f"{tuple(x.shape)}")
    arrays[hf_key] = x
  for k, target in tied.items():
    if k not in sd:
      continue
    target = target if target.startswith(("cls.", "lm_head.")) else f"{base}.{target}"
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
  params = _unflatten(flat)
  if cfg.scan_layers:
    params = stack_layers(params)
  return params


# --------------------------------------------------------------------------------------------
# files

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
ST_MODULES = "modules.json"
# sentence-transformers module classes that wrap an HF encoder (the last part of "type";
# Transformer since v1, BERT / XLMRoBERTa in the oldest saved models)
_ST_ENCODER_CLASSES = ("Transformer", "BERT", "RoBERTa", "XLMRoBERTa")


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


def save_hf(out_dir: str | os.PathLike, params, cfg: EncoderConfig, *,
            extra_config: Mapping[str, Any] | None = None) -> None:
  """Write config.json + model.safetensors (float32, PyTorch layout) loadable by
  `transformers.AutoModelForMaskedLM.from_pretrained(out_dir)`."""
  from safetensors.numpy import save_file
  state = params_to_hf_state_dict(params, cfg, dtype=np.float32)
  config = hf_config_dict(cfg, dtype="float32", extra=extra_config)
  os.makedirs(out_dir, exist_ok=True)
  save_file(state, os.path.join(out_dir, SAFE_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write("\n")


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


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
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
    raise HFFormatError(f"{path}: corrupt safetensors file ({_first_line(e)})") from None
  return out


def _read_pickle(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise HFFormatError(f"reading {path} needs torch, which is not installed") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 -- a cut-off or foreign file: one line naming it
    raise HFFormatError(f"{path}: corrupt or truncated ({_first_line(e)})") from None
  if not isinstance(sd, Mapping):
    raise HFFormatError(f"{path} does not hold a state dict (got {type(sd).__name__})")
  out = {}
  for k, v in sd.items():
    v = v.detach().cpu()
    if v.dtype == torch.bfloat16:
      v = v.float()
    out[k] = v.numpy()
  return out


def weight_files(hf_dir: str, *, allow_pickle: bool = False) -> list[tuple[str, str]]:
  """[(path, "safetensors" | "pickle")] of the weights in `hf_dir`; HFFormatError naming the
  missing file (a missing weights file is never reported as some other problem)."""
  safe = os.path.join(hf_dir, SAFE_WEIGHTS)
  index = os.path.join(hf_dir, SAFE_INDEX)
  pickle = os.path.join(hf_dir, PICKLE_WEIGHTS)
  if os.path.isfile(safe):
    return [(safe, "safetensors")]
  if os.path.isfile(index):
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
  if os.path.isfile(pickle):
    if not allow_pickle:
      raise HFFormatError(f"{hf_dir!r} has only {PICKLE_WEIGHTS}, a pickle that can run code; "
                          f"convert it to {SAFE_WEIGHTS} or pass allow_pickle=True")
    return [(pickle, "pickle")]
  raise HFFormatError(f"{safe}: weights file missing (no {SAFE_INDEX} or {PICKLE_WEIGHTS} "
                      f"either)")


def check_weights(hf_dir: str, *, allow_pickle: bool = False) -> None:
  """The weight files of `hf_dir` exist and are whole (headers only; cheap)."""
  for path, kind in weight_files(hf_dir, allow_pickle=allow_pickle):
    if kind == "safetensors":
      check_safetensors(path)


def load_hf(hf_dir: str | os.PathLike, *, allow_pickle: bool = False, info: dict | None = None,
            **overrides) -> tuple[EncoderConfig, dict]:
  """Read an HF BertForMaskedLM / XLMRobertaForMaskedLM directory -> (EncoderConfig, params).

  Encoder-only directories (BertModel, sentence-transformers) give params without mlm_head.
  Weights come from model.safetensors (or a sharded model.safetensors.index.json);
  pytorch_model.bin is a pickle and is read (with torch.load(weights_only=True)) only when
  allow_pickle=True. `overrides` go to `encoder_config_from_hf` (e.g. dtype, scan_layers).
  `info` receives model_dir, has_head and ignored (see `hf_state_dict_to_params`).
  """
  hf_dir = os.fspath(hf_dir)
  if not os.path.isdir(hf_dir):
    raise HFFormatError(f"HF model directory {hf_dir!r} does not exist")
  hf_dir = resolve_model_dir(hf_dir)
  if info is not None:
    info["model_dir"] = hf_dir
  cfg_path = os.path.join(hf_dir, CONFIG_NAME)
  if not os.path.isfile(cfg_path):
    raise HFFormatError(f"no {CONFIG_NAME} in {hf_dir!r}")
  try:
    with open(cfg_path) as f:
      config_json = json.load(f)
  except json.JSONDecodeError as e:
    raise HFFormatError(f"{cfg_path} is not valid JSON: {e}") from e
  cfg = encoder_config_from_hf(config_json, **overrides)

  state = {}
  for path, kind in weight_files(hf_dir, allow_pickle=allow_pickle):
    state.update(_read_pickle(path) if kind == "pickle" else _read_safetensors(path))
  return cfg, hf_state_dict_to_params(state, cfg, info=info)
