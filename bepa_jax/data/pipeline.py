"""Deterministic batches whose content is a pure function of (seed, step).

Every process computes the same global plan for a step (which meaning, which language
pair, in which row) and then tokenises and masks only its own contiguous slice of rows.
So the global batch is the same whatever the number of processes, and resuming at step
s needs nothing but s. Rows of one batch are distinct meanings, so no sentence appears
twice in a batch (a duplicate would be a false negative for InfoNCE).
"""
from __future__ import annotations

import itertools
import zlib

import numpy as np

from bepa_jax.data.corpus import MultiwayCorpus
from bepa_jax.data.masking import mask_sequence
from bepa_jax.data.tokenizer import Tokenizer


class MultiwayPairPipeline:
  """Sentence pairs drawn from a multi-way corpus: one meaning per row, a random language pair."""

  def __init__(self, corpus: MultiwayCorpus, tokenizer: Tokenizer, *, global_batch: int,
               max_length: int, mask_prob: float, max_predictions: int, seed: int):
    if global_batch > len(corpus):
      raise ValueError(f"train.global_batch={global_batch} exceeds the {len(corpus)} meanings "
                       f"of the corpus: a batch would repeat sentences")
    if len(corpus.languages) < 2:
      raise ValueError(f"need at least 2 languages, got {corpus.languages}")
    self.corpus = corpus
    self.tok = tokenizer
    self.global_batch = global_batch
    self.max_length = max_length
    self.mask_prob = mask_prob
    self.max_predictions = max_predictions
    self.seed = seed
    self.lang_pairs = list(itertools.permutations(range(len(corpus.languages)), 2))
    self.batches_per_epoch = len(corpus) // global_batch
    # The bundled corpus is small: tokenise it once. [meaning][language] -> ids.
    flat = self.tok.encode_batch(list(corpus.texts()))
    n = len(corpus.languages)
    self.ids = [flat[i * n:(i + 1) * n] for i in range(len(corpus))]
    self.truncated = sum(len(t) > max_length - 2 for row in self.ids for t in row)

  def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(meaning index [B], language pair index [B]) of the global batch at `step`."""
    epoch, k = divmod(int(step), self.batches_per_epoch)
    perm = np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.corpus))
    meanings = perm[k * self.global_batch:(k + 1) * self.global_batch]
    pairs = np.random.default_rng([self.seed, 1, int(step)]).integers(
        len(self.lang_pairs), size=self.global_batch)
    return meanings, pairs

  def _encode(self, ids, rng):
    L = self.max_length
    ids = list(ids[:L - 2])
    seq = np.full(L, self.tok.pad_id, np.int32)
    seq[0], seq[1:len(ids) + 1], seq[len(ids) + 1] = self.tok.cls_id, ids, self.tok.sep_id
    attention = (np.arange(L) < len(ids) + 2).astype(np.int32)
    masked, pos, lab, w = mask_sequence(
        seq, len(ids), rng, mask_prob=self.mask_prob, max_predictions=self.max_predictions,
        mask_id=self.tok.mask_id, vocab_size=self.tok.vocab_size,
        random_token_low=max(self.tok.special_ids) + 1)
    return masked, attention, pos, lab, w

  def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
    """This process's rows of the global batch at `step`, as numpy arrays [b, 2, ...]."""
    if self.global_batch % process_count:
      raise ValueError(f"train.global_batch={self.global_batch} is not divisible by "
                       f"{process_count} processes")
    b = self.global_batch // process_count
    meanings, pairs = self.plan(step)
    L, P = self.max_length, self.max_predictions
    out = {"input_ids": np.zeros((b, 2, L), np.int32),
           "token_type_ids": np.zeros((b, 2, L), np.int32),
           "attention_mask": np.zeros((b, 2, L), np.int32),
           "mlm_positions": np.zeros((b, 2, P), np.int32),
           "mlm_ids": np.zeros((b, 2, P), np.int32),
           "mlm_weights": np.zeros((b, 2, P), np.float32),
           # id of each side's text (crc32 of its tokens as encoded, before MLM masking):
           # lets loss.mask_duplicates drop candidates that repeat the positive's text
           "text_hash": np.zeros((b, 2), np.int32)}
    for r in range(b):
      row = process_index * b + r                     # global row: masking is process-count free
      rng = np.random.default_rng([self.seed, 2, int(step), row])
      for side, lang in enumerate(self.lang_pairs[pairs[row]]):
        ids, att, pos, lab, w = self._encode(self.ids[meanings[row]][lang], rng)
        out["input_ids"][r, side], out["attention_mask"][r, side] = ids, att
        out["mlm_positions"][r, side], out["mlm_ids"][r, side] = pos, lab
        out["mlm_weights"][r, side] = w
        text = np.asarray(self.ids[meanings[row]][lang][:L - 2], np.int32).tobytes()
        out["text_hash"][r, side] = np.int64(zlib.crc32(text)).astype(np.int32)
    return out

  def languages_of(self, step: int) -> list[tuple[str, str]]:
    _, pairs = self.plan(step)
    langs = self.corpus.languages
    return [(langs[self.lang_pairs[p][0]], langs[self.lang_pairs[p][1]]) for p in pairs]
