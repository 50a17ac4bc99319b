"""Names on both sides of the HF exchange: our param paths <-> HF state-dict keys, one map per
family (BERT, XLM-R), as data, plus the scanned <-> unscanned layer layouts of our tree.

HF key = <base>.<suffix>, base `bert` / `roberta`; shapes in HF layout; T = transpose; nh heads,
hd head_dim; (H,nh,hd)->T = merge the head axes, then transpose. As data: EMBEDDING_MAP,
LAYER_MAP and each Family's `head`:

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
the head bias (Family.tied), so it is not written. `pooler.*`, `cls.seq_relationship.*` and the
`embeddings.{position_ids,token_type_ids}` buffers are IGNORED on input.

Our tree: unscanned layers live at encoder/layer_{i}/..., scanned ones at encoder/layers/... with
a leading [num_layers] axis (`stack_layers` / `unstack_layers` convert).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np

from bepa_jax.errors import HFFormatError


@dataclasses.dataclass(frozen=True)
class Kind:
  """How one tensor moves between layouts: ours = from_hf(hf), hf = to_hf(ours)."""
  name: str
  to_hf: Callable[[np.ndarray], np.ndarray]
  from_hf: Callable[[np.ndarray, Any], np.ndarray]  # (array, EncoderConfig)
  ours_shape: Callable[[tuple, Any], tuple]


def _qkv_from_hf(w, cfg):  # [nh*hd, H] -> [H, nh, hd]
  return w.T.reshape(cfg.hidden_size, cfg.num_heads, cfg.head_dim)


def _attn_out_from_hf(w, cfg):  # [H, nh*hd] -> [nh, hd, H]
  return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


COPY = Kind("copy", lambda x: x, lambda x, cfg: x, lambda s, cfg: s)
DENSE = Kind("transpose", lambda x: x.T, lambda x, cfg: x.T, lambda s, cfg: s[::-1])
QKV_KERNEL = Kind("qkv_kernel", lambda x: x.reshape(x.shape[0], -1).T, _qkv_from_hf,
                  lambda s, cfg: (cfg.hidden_size, cfg.num_heads, cfg.head_dim))
QKV_BIAS = Kind("qkv_bias", lambda x: x.reshape(-1),
                lambda x, cfg: x.reshape(cfg.num_heads, cfg.head_dim),
                lambda s, cfg: (cfg.num_heads, cfg.head_dim))
ATTN_OUT_KERNEL = Kind("attn_out_kernel", lambda x: x.reshape(-1, x.shape[-1]).T,
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


@dataclasses.dataclass(frozen=True)
class Family:
  """One HF model family: the names on the HF side and the config defaults that differ."""
  model_type: str   # written to config.json
  base: str         # the base model's key prefix
  arch: str         # the MaskedLM architecture
  pad_default: int  # pad_token_id when config.json omits it
  head: tuple       # MLM head rows (ours, full HF key, HF shape symbols, kind)
  tied: Mapping[str, str]  # decoder key -> the key it is tied to (a suffix under base, or full)


BERT = Family(
    model_type="bert", base="bert", arch="BertForMaskedLM", pad_default=0,
    head=(("mlm_head/dense/kernel", "cls.predictions.transform.dense.weight", "HH", DENSE),
          ("mlm_head/dense/bias", "cls.predictions.transform.dense.bias", "H", COPY),
          ("mlm_head/LayerNorm/scale", "cls.predictions.transform.LayerNorm.weight", "H", COPY),
          ("mlm_head/LayerNorm/bias", "cls.predictions.transform.LayerNorm.bias", "H", COPY),
          ("mlm_head/bias", "cls.predictions.bias", "V", COPY)),
    tied={"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
          "cls.predictions.decoder.bias": "cls.predictions.bias"})
XLMR = Family(
    model_type="xlm-roberta", base="roberta", arch="XLMRobertaForMaskedLM", pad_default=1,
    head=(("mlm_head/dense/kernel", "lm_head.dense.weight", "HH", DENSE),
          ("mlm_head/dense/bias", "lm_head.dense.bias", "H", COPY),
          ("mlm_head/LayerNorm/scale", "lm_head.layer_norm.weight", "H", COPY),
          ("mlm_head/LayerNorm/bias", "lm_head.layer_norm.bias", "H", COPY),
          ("mlm_head/bias", "lm_head.bias", "V", COPY)),
    tied={"lm_head.decoder.weight": "embeddings.word_embeddings.weight",
          "lm_head.decoder.bias": "lm_head.bias"})
FAMILIES = {"bert": BERT, "xlmr": XLMR}
# model_type read -> family (RoBERTa has the XLM-R architecture and key names)
MODEL_TYPES = {"bert": "bert", "xlm-roberta": "xlmr", "roberta": "xlmr"}
HEAD_PREFIXES = ("cls.", "lm_head.")
IGNORED = re.compile(r"^(?:(?:bert|roberta)\.)?(?:pooler\..*|embeddings\.position_ids"
                     r"|embeddings\.token_type_ids)$|^cls\.seq_relationship\..*$")


def family(name: str) -> Family:
  if name not in FAMILIES:
    raise HFFormatError(f"unsupported family {name!r}: supported are {sorted(FAMILIES)}")
  return FAMILIES[name]


def hf_shape(symbols: str, cfg) -> tuple:
  dims = dict(V=cfg.vocab_size, P=cfg.max_position_embeddings, T=cfg.type_vocab_size,
              H=cfg.hidden_size, I=cfg.intermediate_size)
  return tuple(dims[s] for s in symbols)


def key_map(cfg) -> list[tuple[str, str, tuple, Kind]]:
  """[(our path under params/ (unscanned), HF key, HF shape, kind)] for an EncoderConfig."""
  fam = family(cfg.family)
  rows = [(o, f"{fam.base}.{h}", hf_shape(s, cfg), k) for o, h, s, k in EMBEDDING_MAP]
  for i in range(cfg.num_layers):
    rows += [(f"encoder/layer_{i}/{o}", f"{fam.base}.encoder.layer.{i}.{h}", hf_shape(s, cfg), k)
             for o, h, s, k in LAYER_MAP]
  rows += [(o, h, hf_shape(s, cfg), k) for o, h, s, k in fam.head]
  return rows


def tied_keys(fam: Family) -> dict[str, str]:
  """Decoder key -> the full HF key it is tied to."""
  return {k: t if t.startswith(HEAD_PREFIXES) else f"{fam.base}.{t}" for k, t in fam.tied.items()}


def is_head_key(hf_key: str) -> bool:
  return hf_key.startswith(HEAD_PREFIXES)


def normalize_key(k: str) -> str:
  """Very old (TF-converted) checkpoints name LayerNorm params gamma / beta."""
  if k.endswith(".gamma"):
    return k[:-len(".gamma")] + ".weight"
  if k.endswith(".beta"):
    return k[:-len(".beta")] + ".bias"
  return k


# --------------------------------------------------------------------------------------------
# our side: plain trees, flat paths, scanned <-> unscanned layers

def to_plain(tree):
  """Unbox nn.Partitioned, unfreeze, unwrap {'params': ...}."""
  from flax.core import unfreeze
  from flax.linen import meta
  tree = unfreeze(meta.unbox(tree))
  if isinstance(tree, Mapping) and set(tree) == {"params"}:
    tree = tree["params"]
  return tree


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


LAYER_RE = re.compile(r"^layer_(\d+)$")


def stack_layers(params):
  """encoder/layer_{i}/... -> encoder/layers/... with a leading [num_layers] axis.

  Accepts boxed or plain params (with or without a {'params': ...} wrapper, kept on output);
  returns plain arrays (jax arrays stay jax, numpy stays numpy). Already-stacked trees pass.
  """
  wrapped = isinstance(params, Mapping) and set(params) == {"params"}
  p = to_plain(params)
  enc = dict(p["encoder"])
  idx = sorted(int(m.group(1)) for k in enc if (m := LAYER_RE.match(k)))
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
  p = to_plain(params)
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


def flatten(tree, prefix="") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}: the paths of the key map."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, path + "/"))
    else:
      out[path] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = v
  return out
