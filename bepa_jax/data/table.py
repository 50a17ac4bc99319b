"""Every record of every component as integers: what the global plan needs of the whole corpus.

The plan of a global batch (data/plan.py) compares the sentences and meanings of all B rows,
and the packer's fit decision (data/packing.py) needs every row's token counts. Reading and
tokenising the other hosts' texts every step would cost each host O(B) record reads and
tokenisations that do not shrink as hosts are added. Instead each record is reduced once,
when the pipeline is built (a scan of the sources, or the record store: data/store.py):

  keys     [N, 2]  per side, a 63-bit content hash of the text (in the store: the text's id,
                   exact); -1 = the record is unusable (empty, too long, not UTF-8): redrawn
  meanings [N]     its meaning in a multi-way source (a row of the embedded corpus or of
                   multi-way aligned files), -1 = none; or no array when no source has any
  lengths  [N, 2]  token counts of each side before any cut (when packing needs them)

flat over the components: record i of component c is row `offsets[c] + i`.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Sequence

import numpy as np

from bepa_jax.data.records import Component

log = logging.getLogger("bepa")

SLOW_SCAN_S = 30.0  # a start-up scan longer than this suggests the record store


def text_key(text: str) -> int:
  """A 63-bit content hash of a text: equal texts, equal keys, on every host and run."""
  return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(),
                        "little") >> 1


class Table:
  """The integer view of a pipeline's components (module docstring)."""

  def __init__(self, offsets: np.ndarray, keys: np.ndarray, meanings: np.ndarray | None = None,
               lengths: np.ndarray | None = None, text_lengths: np.ndarray | None = None):
    self.offsets = np.asarray(offsets, np.int64)
    self.keys, self.meanings = keys, meanings
    self._lengths, self._text_lengths = lengths, text_lengths  # per record, or per text id

  @property
  def has_lengths(self) -> bool:
    return self._lengths is not None or self._text_lengths is not None

  def flat(self, comps: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return self.offsets[comps] + np.asarray(idx, np.int64)

  def usable(self, flat: np.ndarray) -> np.ndarray:
    return np.asarray(self.keys[flat, 0]) >= 0

  def keys_of(self, flat: np.ndarray) -> np.ndarray:
    return np.asarray(self.keys[flat], np.int64)

  def meanings_of(self, flat: np.ndarray) -> np.ndarray | None:
    return None if self.meanings is None else np.asarray(self.meanings[flat], np.int64)

  def lengths_of(self, flat: np.ndarray) -> np.ndarray:
    """[n, 2] token counts of the records' sides (uncut)."""
    if self._lengths is not None:
      return np.asarray(self._lengths[flat], np.int64)
    keys = self.keys_of(flat)
    return np.where(keys >= 0, np.asarray(self._text_lengths)[np.maximum(keys, 0)], 0)


def meaning_ids(components: Sequence[Component], offsets: np.ndarray) -> np.ndarray | None:
  """[N] meaning of every record as a dense integer (`Component.group` values mapped to ids
  in order of first appearance), or None when no component has groups."""
  ids: dict = {}
  out = np.full(int(offsets[-1]), -1, np.int64)
  for c, comp in enumerate(components):
    if type(comp).group is Component.group:   # never grouped
      continue
    base = int(offsets[c])
    for i in range(len(comp)):
      g = comp.group(i)
      if g is not None:
        out[base + i] = ids.setdefault(g, len(ids))
  return out if ids else None


class _Counter:
  """Token counts by text key; each distinct text tokenised once, in chunks."""

  def __init__(self, tokenizer, chunk: int = 65536):
    self.tokenizer, self.chunk = tokenizer, chunk
    self.counts: dict[int, int] = {}
    self.pending: dict[int, str] = {}

  def add(self, key: int, text: str) -> None:
    if key not in self.counts and key not in self.pending:
      self.pending[key] = text
      if len(self.pending) >= self.chunk:
        self.flush()

  def flush(self) -> None:
    for k, ids in zip(self.pending, self.tokenizer.encode_batch(list(self.pending.values()))):
      self.counts[k] = len(ids)
    self.pending.clear()

  def of(self, keys: np.ndarray) -> np.ndarray:
    """[N, 2] counts of `keys` (0 where unusable)."""
    self.flush()
    valid = keys >= 0
    uniq, inverse = np.unique(keys[valid], return_inverse=True)
    out = np.zeros(keys.shape, np.int32)
    out[valid] = np.array([self.counts[int(k)] for k in uniq], np.int32)[inverse]
    return out


def scan(components: Sequence[Component], tokenizer=None) -> Table:
  """Reads every record once: its text keys, meaning and (with a tokenizer) token counts."""
  t0 = time.perf_counter()
  offsets = np.concatenate([[0], np.cumsum([len(c) for c in components])]).astype(np.int64)
  keys = np.full((int(offsets[-1]), 2), -1, np.int64)
  counter = _Counter(tokenizer) if tokenizer is not None else None
  memo: dict[str, int] = {}   # texts held in memory anyway: a multi-way text is hashed once
  for c, comp in enumerate(components):
    base = int(offsets[c])
    cache = memo if comp.in_memory else None   # a lazy reader's texts are not kept
    for i in range(len(comp)):
      pair = comp[i]
      if pair is None:
        continue
      for s in (0, 1):
        k = None if cache is None else cache.get(pair[s])
        if k is None:
          k = text_key(pair[s])
          if cache is not None:
            cache[pair[s]] = k
          if counter is not None:
            counter.add(k, pair[s])
        keys[base + i, s] = k
  table = Table(offsets, keys, meaning_ids(components, offsets),
                None if counter is None else counter.of(keys))
  took = time.perf_counter() - t0
  if took > SLOW_SCAN_S:
    log.warning("data: reading %d pairs at start-up took %.0fs; set data.cache_dir=DIR to do "
                "this once (a record store, reused by later runs and every host)",
                int(offsets[-1]), took)
  return table
