"""Sentence embeddings of a list of texts: one jitted forward pass per fixed-shape batch.

Batches are laid out like training (`[CLS] s [SEP] [PAD]...`, one sentence per row) and split
over the batch mesh axes (data x fsdp); parameters keep their training shardings. Every
process passes the same texts and gets the same replicated [N, D] results back.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import numpy as np

from bepa_jax import mesh as mesh_lib
from bepa_jax.config.specs import MeshSpec
from bepa_jax.model import encoder_params, mean_pool


def encode_texts(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """texts -> (input_ids [N, L], attention_mask [N, L]); long sentences are truncated."""
  L = int(max_length)
  ids = np.full((len(texts), L), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(texts), L), np.int32)
  for i, toks in enumerate(tokenizer.encode_batch(list(texts))):
    toks = list(toks[:L - 2])
    ids[i, 0], ids[i, 1:len(toks) + 1], ids[i, len(toks) + 1] = (
        tokenizer.cls_id, toks, tokenizer.sep_id)
    mask[i, :len(toks) + 2] = 1
  return ids, mask


def unknown_counts(tokenizer, texts: Sequence[str]) -> tuple[int, int, int, int]:
  """(tokens that are [UNK], tokens, sentences of nothing but [UNK] and blank pieces such as a
  bare `▁`, non-blank sentences) of `texts`: how much of a language the tokenizer never saw."""
  known: dict[int, bool] = {tokenizer.unk_id: False}  # piece id -> carries text
  unk = total = reduced = sentences = 0
  for text, toks in zip(texts, tokenizer.encode_batch(list(texts))):
    if not text.strip():
      continue
    sentences += 1
    total += len(toks)
    unk += sum(1 for t in toks if t == tokenizer.unk_id)
    for t in toks:
      if t not in known:
        known[t] = bool(tokenizer.decode([t]).strip())
    reduced += not any(known[t] for t in toks)
  return unk, total, reduced, sentences


def inference_mesh(mesh_cfg, fsdp: int = 1, tensor: int = 1):
  """(mesh, mesh spec) for evaluation and fine-tuning: every device on the batch, with the
  saved logical-axis rules; fsdp/tensor > 1 shard the weights as in training."""
  spec = MeshSpec(data=-1, fsdp=fsdp, tensor=tensor, dcn_data=1, rules=mesh_lib.rules(mesh_cfg),
                  shard_optimizer=False)
  return mesh_lib.create_mesh(spec), spec


def shard_params(model, params, mesh, mesh_cfg, max_length: int):
  """Places plain (host or device) params onto `mesh` with the model's logical shardings."""
  params = encoder_params(params)
  example = np.zeros((1, int(max_length)), np.int32)
  boxed = jax.eval_shape(lambda r: model.init(r, example, mlm_positions=example[:, :1])["params"],
                         jax.random.key(0))
  shardings = nn.meta.unbox(mesh_lib.logical_shardings(boxed, mesh, mesh_cfg))
  shardings = {k: shardings[k] for k in params}
  return jax.tree.map(lambda p, s: jax.device_put(np.asarray(p) if not isinstance(p, jax.Array)
                                                  else p, s), params, shardings)


class Embedder:
  """`embedder(texts) -> {"cls": [N, D], "mean": [N, D]}` (float32 numpy).

  `params` may be reassigned between calls (periodic evaluation): the jitted forward is reused.
  """

  def __init__(self, model, params, tokenizer, mesh, *, max_length: int, batch_size: int = 64,
               rules=()):
    self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
    self.params = params
    self.max_length = int(max_length)
    shards = int(np.prod([mesh.shape[a] for a in mesh_lib.BATCH_AXES]))
    self.batch_size = -(-max(int(batch_size), 1) // shards) * shards  # a multiple of the shards
    self.rules = tuple(rules)
    self._batch_sharding = mesh_lib.batch_sharding(mesh)

    def forward(params, ids, mask):
      with nn.logical_axis_rules(self.rules):
        out = model.apply({"params": params}, ids, None, mask, deterministic=True)
      return out["cls"], mean_pool(out["hidden"], mask)

    self._forward = jax.jit(forward, out_shardings=mesh_lib.replicated(mesh))

  def _put(self, a: np.ndarray):
    return jax.make_array_from_callback(a.shape, self._batch_sharding, lambda idx: a[idx])

  def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    ids, mask = encode_texts(self.tokenizer, texts, self.max_length)
    n, bs = len(texts), self.batch_size
    cls, mean = [], []
    with jax.set_mesh(self.mesh):
      for start in range(0, n, bs):
        b_ids = np.full((bs, self.max_length), self.tokenizer.pad_id, np.int32)
        b_mask = np.zeros((bs, self.max_length), np.int32)
        stop = min(start + bs, n)
        b_ids[:stop - start], b_mask[:stop - start] = ids[start:stop], mask[start:stop]
        c, m = self._forward(encoder_params(self.params), self._put(b_ids), self._put(b_mask))
        cls.append(np.asarray(c)[:stop - start])
        mean.append(np.asarray(m)[:stop - start])
    D = self.model.cfg.hidden_size
    empty = np.zeros((0, D), np.float32)
    return {"cls": np.concatenate(cls) if cls else empty,
            "mean": np.concatenate(mean) if mean else empty}
