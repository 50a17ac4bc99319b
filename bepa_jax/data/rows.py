"""A process's pairs -> its rows of the padded batch: tokenised, padded, masked (data/batch_spec.py
lists the arrays).

Masking is vectorised over a process's rows; its random numbers come from one Philox stream
per step jumped to the process's first row, so they are independent of the process count.
"""
from __future__ import annotations

import collections
import zlib

import numpy as np

from bepa_jax.data.masking import mask_batch
from bepa_jax.data.tokenizer import Tokenizer


class RowMaker:
  """Token rows of the padded layout: [CLS] s [SEP] [PAD]... per sentence, BERT-masked, plus the
  TLM pair sequence per pair (loss.mlm_input=pair)."""

  def __init__(self, tokenizer: Tokenizer, *, max_length: int, mask_prob: float,
               max_predictions: int, seed: int, cls_input: str, mlm_input: str,
               counters: collections.Counter):
    self.tok = tokenizer
    self.max_length, self.mask_prob = int(max_length), float(mask_prob)
    self.max_predictions, self.seed = int(max_predictions), int(seed)
    self.cls_input, self.mlm_input = cls_input, mlm_input
    self.counters = counters  # truncated sentences and TLM sides

  def _tokenise(self, ids: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sequences [N, L], content lengths [N], crc32 of each side's tokens [N])."""
    L, tok, N = self.max_length, self.tok, len(ids)
    cut = [np.asarray(t[:L - 2], np.int32) for t in ids]
    n = np.array([len(t) for t in cut], np.int64)
    self.counters["truncated"] += sum(len(t) > L - 2 for t in ids)
    flat = np.concatenate(cut) if N else np.zeros(0, np.int32)
    ends = np.cumsum(n)
    seq = np.full((N, L), tok.pad_id, np.int32)
    seq[np.repeat(np.arange(N), n), 1 + np.arange(len(flat)) - np.repeat(ends - n, n)] = flat
    seq[:, 0] = tok.cls_id
    seq[np.arange(N), n + 1] = tok.sep_id
    # crc32 of each side's tokens before masking: lets
    # loss.mask_duplicates drop candidates repeating the positive's text
    hashes = np.array([zlib.crc32(flat[a:b].tobytes()) for a, b in
                       zip((ends - n).tolist(), ends.tolist())], np.int64).astype(np.int32)
    return seq, n, hashes

  def make(self, flat: list[str], position: int, first_row: int):
    """x, y, x, y, ... of b pairs (global rows first_row..) at stream `position` ->
    (batch [b, 2, ...] padded to max_length, sentence lengths [b, 2] with [CLS]/[SEP],
    pair-sequence lengths [b] or None)."""
    return self.make_ids(self.tok.encode_batch(flat), position, first_row)

  def make_ids(self, ids: list, position: int, first_row: int):
    """`make` from the token ids of the sentences (tokenised already: the record store)."""
    b, L = len(ids) // 2, self.max_length
    seq, n, hashes = self._tokenise(ids)
    u = self.uniforms(position, first_row, b)
    shape = lambda a: a.reshape((b, 2) + a.shape[1:])
    out = {"token_type_ids": np.zeros((b, 2, L), np.int32),
           "attention_mask": shape((np.arange(L)[None] < (n + 2)[:, None]).astype(np.int32)),
           "text_hash": shape(hashes)}
    lengths = shape(n + 2)
    if self.mlm_input == "pair":
      out["input_ids"] = shape(seq)
      pair_mlm, pair_lengths = self._pair_mlm(ids, u.reshape(b, -1))
      out.update(pair_mlm)
      return out, lengths, pair_lengths
    masked, pos, lab, w = self._mask(seq, n, u.reshape(2 * b, -1), self.max_predictions)
    if self.cls_input == "clean":  # [CLS] from the clean sentence, MLM on its own pass
      out["input_ids"], out["mlm_input_ids"] = shape(seq), shape(masked)
    else:
      out["input_ids"] = shape(masked)
    out.update(mlm_positions=shape(pos), mlm_ids=shape(lab), mlm_weights=shape(w))
    return out, lengths, None

  def _mask(self, seq, n, u, max_predictions, maskable=None):
    tok = self.tok
    return mask_batch(seq, n, u, mask_prob=self.mask_prob, max_predictions=max_predictions,
                      mask_id=tok.mask_id, vocab_size=tok.vocab_size,
                      random_token_low=max(tok.special_ids) + 1, maskable=maskable)

  def _pair_mlm(self, ids: list, u: np.ndarray) -> tuple[dict, np.ndarray]:
    """TLM (XLM; the authors' `bilingual` MLM): one `[CLS] x [SEP] [CLS] y [SEP]` sequence per
    pair, each side cut to (max_length - 4) // 2 tokens, positions running on across both
    halves, masked jointly (2 * max_predictions positions over both sides).

    -> ({mlm_input_ids, mlm_attention_mask [b, L]; mlm_positions, mlm_ids, mlm_weights
    [b, 2P]}, sequence lengths [b]).
    """
    L, tok = self.max_length, self.tok
    half = (L - 4) // 2
    b = len(ids) // 2
    seq = np.full((b, L), tok.pad_id, np.int32)
    maskable = np.zeros((b, L), bool)
    total = np.zeros(b, np.int64)
    for r in range(b):
      x, y = ids[2 * r][:half], ids[2 * r + 1][:half]
      if len(ids[2 * r]) > half or len(ids[2 * r + 1]) > half:
        self.counters["pair_side_truncated"] += 1
      nx, ny = len(x), len(y)
      seq[r, :nx + ny + 4] = [tok.cls_id, *x, tok.sep_id, tok.cls_id, *y, tok.sep_id]
      maskable[r, 1:nx + 1] = True
      maskable[r, nx + 3:nx + ny + 3] = True
      total[r] = nx + ny + 4
    masked, pos, lab, w = self._mask(seq, maskable.sum(1), u, 2 * self.max_predictions,
                                     maskable)
    return {"mlm_input_ids": masked,
            "mlm_attention_mask": (np.arange(L)[None] < total[:, None]).astype(np.int32),
            "mlm_positions": pos, "mlm_ids": lab, "mlm_weights": w}, total

  def uniforms(self, position: int, first_row: int, count: int) -> np.ndarray:
    """[count, 2, D] uniforms of global rows first_row.. at `position`; D = L + 2P (padded
    to 4).

    One counter-based (Philox) stream per step, jumped to the first row: a row's numbers
    do not depend on which process draws them, and a process draws only its own rows.
    """
    L, P = self.max_length, self.max_predictions
    d = -(-(L + 2 * P) // 2) * 2        # 2 sides x d doubles per row: a multiple of 4
    key = np.random.SeedSequence([self.seed, 2, int(position)]).generate_state(2, np.uint64)
    bitgen = np.random.Philox(key=key)
    bitgen.advance(first_row * 2 * d // 4)    # Philox counts blocks of 4 doubles
    return np.random.Generator(bitgen).random((count, 2, d))
