"""Sequence packing with static shapes: several sentences per row of `max_length` tokens.

A packed batch is a pure function of the padded one (PairPipeline builds the padded rows,
masks them, then packs), so the two hold the same tokens and the same MLM targets.

Packing groups. The global batch of B pairs is cut into G = (batch shards) x k groups, k the
number of micro-batches or GradCache chunks (1 without either). Group (shard s, micro-batch i)
holds the pairs that `gradcache.split` put into micro-batch i on shard s,
so every shard packs only its own rows and every micro-batch keeps whole groups:

  local pair q = s * g * k + j * k + i   (g = pairs per group, j < g)   ->  group s * k + i

The packed arrays are [G, R, L] (R rows per group, static), sharded like the pairs over their
leading axis. A sentence is addressed by its flat index r * L + t in its group's R x L grid:
`cls_index` [B, 2] (its [CLS]) and `mlm_positions` (its masked tokens) hold such indices, so
the model gathers [CLS] and MLM positions from the packed rows by index, in the pairs' order.
"""
from __future__ import annotations

import numpy as np


def group_of_pairs(b: int, shards: int, k: int) -> np.ndarray:
  """[b] local pair -> local group, for b pairs on `shards` local shards and k micro-batches."""
  q = np.arange(b)
  per_shard = b // shards
  return (q // per_shard) * k + (q % per_shard) % k


def pairs_by_group(b: int, shards: int, k: int) -> np.ndarray:
  """[G_local, g] local pair indices of each group, in the group's order (j ascending)."""
  group = group_of_pairs(b, shards, k)
  return np.argsort(group, kind="stable").reshape(shards * k, -1)


def first_fit(lengths: np.ndarray, capacity: int):
  """First-fit decreasing (stable) of items into bins of `capacity` tokens.

  -> (bin [n], offset in bin [n], bins used). Deterministic: a pure function of the lengths.
  """
  order = np.argsort(-np.asarray(lengths), kind="stable")
  free: list[int] = []
  row = np.zeros(len(lengths), np.int64)
  offset = np.zeros(len(lengths), np.int64)
  for i in order:
    n = int(lengths[i])
    for r, f in enumerate(free):
      if f >= n:
        break
    else:
      r = len(free)
      free.append(capacity)
    row[i], offset[i] = r, capacity - free[r]
    free[r] -= n
  return row, offset, len(free)


def rows_needed(lengths: np.ndarray, capacity: int) -> np.ndarray:
  """[G, n] item lengths -> [G] rows first-fit needs for each group."""
  return np.array([first_fit(l, capacity)[2] for l in lengths], np.int64)


def pack(seqs: list[np.ndarray], lengths: np.ndarray, capacity: int, rows: int, pad_id: int):
  """Packs items group by group; all `seqs` share one layout.

  seqs: arrays [G, n, L] (e.g. the clean and the masked sentences; the first n tokens of item
  are real), lengths [G, n] -> (packed [G, rows, L] per seq, segment_ids [G, rows, L] (0 = pad,
  1.. = the item's number in its row), start [G, n] flat index of each item's first token in
  its group's rows x L grid), or None when some group needs more than `rows` rows.
  """
  G, n = lengths.shape
  L = seqs[0].shape[-1]
  out = [np.full((G, rows, L), pad_id, s.dtype) for s in seqs]
  segment_ids = np.zeros((G, rows, L), np.int32)
  start = np.zeros((G, n), np.int64)
  for gi in range(G):
    row, offset, used = first_fit(lengths[gi], capacity)
    if used > rows:
      return None
    count = np.zeros(rows, np.int32)
    for i in range(n):
      r, o, m = int(row[i]), int(offset[i]), int(lengths[gi, i])
      for dst, src in zip(out, seqs):
        dst[gi, r, o:o + m] = src[gi, i, :m]
      count[r] += 1
      segment_ids[gi, r, o:o + m] = count[r]
      start[gi, i] = r * L + o
  return out, segment_ids, start
