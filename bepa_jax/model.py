"""A BERT / XLM-R encoder in Flax Linen, with the MLM head applied at gathered positions.

One module covers both families by config (`EncoderConfig.family`):
  bert : positions 0..L-1, token types, LayerNorm eps 1e-12 (BERT, mBERT)
  xlmr : positions pad+1.. over non-pad tokens only, one token type, eps 1e-5 (XLM-R, RoBERTa)
Both are post-LayerNorm with exact (erf) GELU, as in HF transformers, so HF weights load
without numerical drift. Every parameter names its logical axes
(`nn.with_logical_partitioning`); `mesh.py` maps them to mesh axes from config.
Module and parameter names follow HF's so that `hf.py` stays a plain key map.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  vocab_size: int
  family: str = "bert"
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  fused_qkv: bool = False  # one [H, 3, heads, kv] matmul; same parameters, same names
  weight_grads_fp32: bool = False  # see weight_dot: fp32 weight gradients under bf16 compute

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int | None = None) -> "EncoderConfig":
    """From `config.model` or an EncoderConfig (the config's validation refused unknown keys)."""
    kw = (dataclasses.asdict(model_cfg) if isinstance(model_cfg, EncoderConfig)
          else dict(model_cfg.items()))
    if vocab_size is not None and not kw.get("vocab_size"):
      kw["vocab_size"] = vocab_size
    return cls(**kw)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def fp32_grads(self) -> bool:
    """Weight gradients need their own fp32 path: bf16 compute with weight_grads_fp32."""
    return self.weight_grads_fp32 and self.compute_dtype != jnp.float32


# The EncoderConfig fields that fix the parameters' shapes (and what token ids mean): a checkpoint
# saved with other values cannot be restored (checkpoint/store.py); an HF config.json sets them.
SHAPE_FIELDS = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size")
# The fields an HF config.json fixes (hf/init.py copies them into config.model): the shape, plus
# the family's numerics.
HF_FIELDS = SHAPE_FIELDS + ("layer_norm_eps", "pad_token_id")


def gelu(x):
  return jax.nn.gelu(x, approximate=False)  # HF "gelu" is the exact erf form


def normal_init(cfg: EncoderConfig, names):
  """BERT's N(0, initializer_range) initialiser, sharded by the logical axes `names` (also the
  task heads' of bepa_jax/finetune)."""
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), names)


def zeros_init(names):
  """Zeros, sharded by the logical axes `names` (biases)."""
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(names):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def layer_norm(cfg: EncoderConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                      scale_init=_ones(("embed",)), bias_init=zeros_init(("embed",)), name=name)


def position_ids(cfg: EncoderConfig, input_ids, segment_ids=None):
  """BERT counts from 0; XLM-R counts non-pad tokens from pad+1 (HF's create_position_ids).

  With `segment_ids` (packed rows, 0 = pad) both restart at each segment's first token, so a
  packed sentence gets the positions it has alone.
  """
  if segment_ids is not None:
    idx = jax.lax.broadcasted_iota(jnp.int32, segment_ids.shape, 1)
    first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(first, idx, 0), axis=1)
    pos = idx - start
    if cfg.family == "xlmr":
      return jnp.where(segment_ids > 0, pos + cfg.pad_token_id + 1, cfg.pad_token_id)
    return pos
  if cfg.family == "xlmr":
    not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
  return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


def weight_dot(cfg: EncoderConfig, x, kernel, n_in: int = 1, kernel_in_front: bool = True,
               bias=None):
  """x [..., in] times an fp32 parameter `kernel` ([in..., out...], or [out..., in...] with
  kernel_in_front=False, as the tied decoder's [V, H]), plus `bias` [out...], in the compute
  dtype.

  With bf16 compute, the kernel's gradient is a bf16 dot's output, so each batch shard's partial
  sum is rounded to bf16 and XLA:TPU sums the shards in bf16 (bench/grad_reduce_dtype.py); the
  bias's likewise. With cfg.weight_grads_fp32 both gradients are formed in fp32 instead: the
  same forward, an fp32 sum.
  """
  dot = _fp32_grad_dot if cfg.fp32_grads else _biased_dot
  return dot(x.astype(cfg.compute_dtype), kernel, bias, n_in, kernel_in_front)


def _dot(x, w, n_in, front):
  w_in = tuple(range(n_in)) if front else tuple(range(w.ndim - n_in, w.ndim))
  return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n_in, x.ndim)), w_in), ((), ())))


def _biased_dot(x, w, b, n_in, front):
  """x . w + b with w and b cast to x's (the compute) dtype."""
  y = _dot(x, w.astype(x.dtype), n_in, front)
  return y if b is None else y + b.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fp32_grad_dot(x, w, b, n_in, front):
  return _biased_dot(x, w, b, n_in, front)


def _fp32_grad_dot_fwd(x, w, b, n_in, front):
  return _biased_dot(x, w, b, n_in, front), (x, w, b)


def _fp32_grad_dot_bwd(n_in, front, res, g):
  x, w, b = res
  n_free = x.ndim - n_in                   # y = [x's free dims..., w's free dims...]
  w_free = tuple(range(n_in, w.ndim)) if front else tuple(range(w.ndim - n_in))
  gx = jax.lax.dot_general(g, w.astype(x.dtype), ((tuple(range(n_free, g.ndim)), w_free),
                                                   ((), ())))
  lead = tuple(range(n_free))              # sum over the batch: -> [in..., out...], fp32
  gw = _fp32_sum_dot(x, g, ((lead, lead), ((), ())))
  if not front:                            # -> [out..., in...]
    gw = jnp.moveaxis(gw, tuple(range(n_in)), tuple(range(gw.ndim - n_in, gw.ndim)))
  gb = None if b is None else jnp.sum(g, axis=lead, dtype=jnp.float32).astype(b.dtype)
  return gx.astype(x.dtype), gw.astype(w.dtype), gb


_fp32_grad_dot.defvjp(_fp32_grad_dot_fwd, _fp32_grad_dot_bwd)


def _fp32_sum_dot(a, b, dims):
  """bf16 a . b with fp32 products and sums. XLA:CPU's runtime has no bf16 x bf16 -> f32 dot
  for every fusion (UNIMPLEMENTED in DotThunk), so on CPU the operands are cast up first: the
  same result, as bf16 products are exact in fp32. Chosen by the compile target, so an AOT
  compile for TPU on a CPU host keeps the bf16 dot."""
  bf16_in = lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
  f32_in = lambda a, b: jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32), dims,
                                            precision=jax.lax.Precision.HIGHEST)
  return jax.lax.platform_dependent(a, b, cpu=f32_in, default=bf16_in)


def attention(q, k, v, segment_ids, dropout=None):
  """Softmax attention of q, k, v [N, L, heads, d] within segments; the XLA form.

  Query i sees key j iff segment_ids[j] != 0 and segment_ids[i] == segment_ids[j]: a block-
  diagonal mask for packed rows (segments 1, 2, ...; 0 = pad) and the usual key-padding mask
  for one sentence per row (segment_ids = attention_mask). Pad queries (0) see every real key,
  as in HF; no loss reads them. This signature is the one of segment-id kernels, which can
  replace the body on accelerators: TPU splash attention (jax.experimental.pallas.ops.tpu.
  splash_attention with SegmentIds(q=segment_ids, kv=segment_ids)), or on GPU
  jax.nn.dot_product_attention(q, k, v, mask=..., implementation="cudnn"). `dropout`: a function
  applied to the probabilities (training), or None.
  """
  seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
  visible = (seg_k != 0) & ((seg_q == seg_k) | (seg_q == 0))
  bias = jnp.where(visible[:, None], 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  if dropout is not None:
    probs = dropout(probs)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Embeddings(nn.Module):
  cfg: EncoderConfig

  def setup(self):
    cfg = self.cfg
    self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
                                    embedding_init=normal_init(cfg, ("vocab", "embed")))
    self.position_embeddings = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                                        dtype=cfg.compute_dtype,
                                        embedding_init=normal_init(cfg, ("position", "embed")))
    self.token_type_embeddings = nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                                          dtype=cfg.compute_dtype,
                                          embedding_init=normal_init(cfg, ("type", "embed")))
    self.LayerNorm = layer_norm(cfg, "LayerNorm")
    self.dropout = nn.Dropout(cfg.hidden_dropout)

  def __call__(self, input_ids, token_type_ids, deterministic: bool, segment_ids=None):
    cfg = self.cfg
    # nn.Embed casts the whole table to the compute dtype, so its gradient is a bf16 scatter-add;
    # with fp32 weight gradients the rows are cast after the lookup (the same values).
    look = ((lambda e, ids: jnp.take(e.embedding, ids, axis=0).astype(cfg.compute_dtype))
            if cfg.fp32_grads else (lambda e, ids: e(ids)))
    x = (look(self.word_embeddings, input_ids)
         + look(self.position_embeddings, position_ids(cfg, input_ids, segment_ids))
         + look(self.token_type_embeddings, token_type_ids))
    return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class HeadsDense(nn.Module):
  """x [..., in_dims] -> [..., out_dims] with a kernel shaped in_dims + out_dims.

  Keeps the head axis explicit ([embed, heads, kv] / [heads, kv, embed]) so that tensor
  parallelism can shard it by name. (flax's DenseGeneral builds a flat kernel first,
  which clashes with per-axis logical names at init.) `weights()` alone serves the fused
  QKV path, which stacks three of them under the same parameter names.
  """
  cfg: EncoderConfig
  in_dims: tuple
  out_dims: tuple
  kernel_axes: tuple
  bias_axes: tuple

  @nn.compact
  def weights(self):
    kernel = self.param("kernel", normal_init(self.cfg, self.kernel_axes),
                        self.in_dims + self.out_dims, jnp.float32)
    bias = self.param("bias", zeros_init(self.bias_axes), self.out_dims, jnp.float32)
    return kernel, bias

  def __call__(self, x):
    cfg = self.cfg
    kernel, bias = self.weights()
    return weight_dot(cfg, x, kernel, len(self.in_dims), bias=bias)


class SelfAttention(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, segment_ids, deterministic: bool):
    cfg = self.cfg
    heads = (cfg.num_heads, cfg.head_dim)
    proj = functools.partial(HeadsDense, cfg, (cfg.hidden_size,), heads, ("embed", "heads", "kv"),
                             ("heads", "kv"))
    if cfg.fused_qkv:  # concatenating the kernels costs 3*H*H copies; the matmul is 3x wider
      kb = [proj(name=n).weights() for n in ("query", "key", "value")]
      kernel = jnp.stack([w for w, _ in kb], axis=1)  # [H, 3, nh, hd]
      qkv = weight_dot(cfg, x, kernel, bias=jnp.stack([b for _, b in kb], axis=0))
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      q, k, v = (proj(name=n)(x) for n in ("query", "key", "value"))
    q = q / jnp.sqrt(cfg.head_dim).astype(cfg.compute_dtype)
    drop = nn.Dropout(cfg.attention_dropout)
    ctx = attention(q, k, v, segment_ids, lambda p: drop(p, deterministic=deterministic))
    return HeadsDense(cfg, heads, (cfg.hidden_size,), ("heads", "kv", "embed"), ("embed",),
                      name="output")(ctx)


class Layer(nn.Module):
  """One post-LN transformer layer; returns (x, None) so it can be scanned."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, segment_ids, deterministic: bool):
    cfg = self.cfg
    drop = nn.Dropout(cfg.hidden_dropout)
    h = SelfAttention(cfg, name="attention")(x, segment_ids, deterministic)
    x = layer_norm(cfg, "attention_LayerNorm")(x + drop(h, deterministic=deterministic))
    h = HeadsDense(cfg, (cfg.hidden_size,), (cfg.intermediate_size,), ("embed", "mlp"), ("mlp",),
                   name="intermediate")(x)
    h = HeadsDense(cfg, (cfg.intermediate_size,), (cfg.hidden_size,), ("mlp", "embed"),
                   ("embed",), name="output")(gelu(h))
    x = layer_norm(cfg, "output_LayerNorm")(x + drop(h, deterministic=deterministic))
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    return x, None


_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Encoder(nn.Module):
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x, segment_ids, deterministic: bool):
    cfg = self.cfg
    layer_cls = Layer
    if cfg.remat != "none":
      layer_cls = nn.remat(Layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers,
                           static_argnums=(3,))  # (self, x, segment_ids, deterministic)
    if cfg.scan_layers:
      scanned = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                             "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(cfg, name="layers")(x, segment_ids, deterministic)
    else:
      for i in range(cfg.num_layers):
        x, _ = layer_cls(cfg, name=f"layer_{i}")(x, segment_ids, deterministic)
    return x


class MLMHead(nn.Module):
  """dense -> GELU -> LayerNorm -> decoder tied to the word embeddings + bias."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, h, word_embeddings: nn.Embed, decode: bool = True):
    """[..., V] logits; decode=False: (the transformed h [..., H], (embeddings [V, H], bias
    [V])), for a loss that applies the decoder itself (objective/mlm.py's chunked_mlm_loss).
    The parameters are the same either way."""
    cfg = self.cfg
    h = HeadsDense(cfg, (cfg.hidden_size,), (cfg.hidden_size,), ("embed", "mlp"), ("mlp",),
                   name="dense")(h)
    h = layer_norm(cfg, "LayerNorm")(gelu(h)).astype(cfg.compute_dtype)
    bias = self.param("bias", zeros_init(("vocab",)), (cfg.vocab_size,), jnp.float32)
    embedding = word_embeddings.embedding
    if not decode:  # the chunked loss casts each vocabulary chunk; its gradient takes this dtype
      return h, (embedding if cfg.fp32_grads else embedding.astype(cfg.compute_dtype), bias)
    logits = weight_dot(cfg, h, embedding, kernel_in_front=False)  # h @ embedding.T
    return logits.astype(jnp.float32) + bias


# The top-level keys of BepaEncoder's own parameter tree. A train state's params may hold more
# (`bepa_head`, the contrastive head's parameters); HF export and evaluation read only these.
ENCODER_KEYS = ("embeddings", "encoder", "mlm_head")

# Sentence embeddings of an encoder: the last-layer [CLS] (what BEPA trains) or the mean of the
# last layer over the real tokens. Evaluation, transfer and export name them this way.
POOLINGS = ("cls", "mean")


def mean_pool(hidden, attention_mask):
  """[N, L, D] hidden states, [N, L] mask -> [N, D] float32 mean over the real tokens."""
  m = attention_mask[..., None].astype(jnp.float32)
  return (hidden.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def encoder_params(params) -> dict:
  """The encoder's own subtree of `params` (what `BepaEncoder.apply` and HF export take)."""
  return {k: params[k] for k in ENCODER_KEYS if k in params}


class BepaEncoder(nn.Module):
  """Encoder + MLM head. Outputs hidden states, the last-layer [CLS] and masked-position logits."""
  cfg: EncoderConfig

  def setup(self):
    self.embeddings = Embeddings(self.cfg)
    self.encoder = Encoder(self.cfg)
    self.mlm_head = MLMHead(self.cfg)

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None, mlm_positions=None,
               deterministic: bool = True, segment_ids=None, cls_index=None,
               mlm_decode: bool = True) -> dict[str, Any]:
    """One sentence per row: input_ids [N, L], mlm_positions [N, P] index each row.

    Packed (bepa_jax/data/packing.py): input_ids, token_type_ids, segment_ids [G, R, L]; each
    group's R x L tokens form one grid, and cls_index [G, n] / mlm_positions [G, m] are flat
    indices r * L + t into it: "cls" [G, n, H], "mlm_logits" [G, m, V].
    mlm_decode=False: "mlm_hidden" [..., H] (the head before its decoder) and "mlm_decoder"
    (word embeddings [V, H], bias [V]) instead of "mlm_logits" (no [positions, V] array).
    """
    packed = segment_ids is not None
    grid = input_ids.shape[:-1]
    if packed:  # encode the G x R rows as one batch; gather from each group's grid
      rows = lambda a: a.reshape((-1, a.shape[-1]))
      input_ids, segment_ids = rows(input_ids), rows(segment_ids).astype(jnp.int32)
      token_type_ids = None if token_type_ids is None else rows(token_type_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if not packed:
      if attention_mask is None:
        attention_mask = (input_ids != self.cfg.pad_token_id)
      segment_ids = attention_mask.astype(jnp.int32)  # one segment per row: key padding
    x = self.embeddings(input_ids, token_type_ids, deterministic,
                        segment_ids if packed else None)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    hidden = self.encoder(x, segment_ids, deterministic)
    flat = hidden.reshape(grid[:1] + (-1, hidden.shape[-1])) if packed else hidden
    pick = lambda idx: jnp.take_along_axis(flat, idx[..., None].astype(jnp.int32), axis=1)
    cls = hidden[:, 0] if cls_index is None else pick(cls_index)
    out = {"hidden": hidden, "cls": cls.astype(jnp.float32)}
    if mlm_positions is not None:
      mlm = self.mlm_head(pick(mlm_positions), self.embeddings.word_embeddings, mlm_decode)
      if mlm_decode:
        out["mlm_logits"] = mlm
      else:
        out["mlm_hidden"], out["mlm_decoder"] = mlm
    return out

  def mlm_logits_all(self, input_ids, token_type_ids=None, attention_mask=None):
    """MLM logits at every position (for export parity checks, not for training)."""
    L = input_ids.shape[1]
    pos = jnp.broadcast_to(jnp.arange(L), input_ids.shape)
    return self(input_ids, token_type_ids, attention_mask, pos)["mlm_logits"]
