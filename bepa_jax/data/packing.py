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

import collections

import numpy as np

from bepa_jax.errors import ConfigError


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


def first_fit_groups(lengths: np.ndarray, capacity: int, limit: int | None = None):
  """`first_fit` of every group at once: lengths [G, n] -> (bin [G, n], offset [G, n], bins
  used [G]), the same as first_fit group by group, vectorised.

  First-fit decreasing places a run of equal items by filling the bins in order, each bin
  taking as many as its free room holds (the bins before it had no room for one, and still
  have none). So the passes go over the distinct lengths (at most `capacity`), not the
  items, each over [G, bins]. With `limit`, only whether a group fits `limit` bins is exact:
  a group that needs more has used = limit + 1 (its bins and offsets past `limit` mean
  nothing).
  """
  lengths = np.asarray(lengths, np.int64)
  G, n = lengths.shape
  row, offset = np.zeros((G, n), np.int64), np.zeros((G, n), np.int64)
  if not n:
    return row, offset, np.zeros(G, np.int64)
  if lengths.max() > capacity or lengths.min() < 1:
    raise ValueError(f"item lengths must lie in 1..{capacity}")
  width = n if limit is None else min(n, limit + 1)
  free = np.full((G, width), capacity, np.int64)
  if limit is not None and width == limit + 1:
    free[:, -1] = capacity * n   # overflow: holds whatever does not fit
  group = np.repeat(np.arange(G), n)
  item = np.tile(np.arange(n), G)
  size = lengths.reshape(-1)
  order = np.lexsort((item, group, -size))       # decreasing length, then group, then item
  group, item, size = group[order], item[order], size[order]
  cuts = np.flatnonzero(np.diff(size)) + 1
  step = width * n + 1                           # separates the groups' cumulative counts
  for a, b in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(size)]])):
    g, i, m = group[a:b], item[a:b], int(size[a])
    count = np.bincount(g, minlength=G)
    j = np.arange(b - a) - (np.cumsum(count) - count)[g]    # rank in its group's run
    k = np.minimum(free // m, n)                 # how many items each bin takes
    cum = np.cumsum(k, axis=1)
    before = cum - k
    r = np.searchsorted((cum + np.arange(G)[:, None] * step).reshape(-1), j + g * step,
                        side="right") - g * width
    row[g, i] = r
    offset[g, i] = capacity - free[g, r] + (j - before[g, r]) * m
    free -= np.clip(count[:, None] - before, 0, k) * m
  return row, offset, row.max(1) + 1


def rows_needed(lengths: np.ndarray, capacity: int, limit: int | None = None) -> np.ndarray:
  """[G, n] item lengths -> [G] rows first-fit needs for each group (with `limit`: exact up to
  `limit`, limit + 1 for a group that needs more); `first_fit_groups`' third output, without
  placing the items: one pass per distinct length over [G, bins], from a histogram."""
  lengths = np.asarray(lengths, np.int64)
  G, n = lengths.shape
  if not n:
    return np.zeros(G, np.int64)
  width = n if limit is None else min(n, limit + 1)
  free = np.full((G, width), capacity, np.int64)
  if limit is not None and width == limit + 1:
    free[:, -1] = capacity * n
  hist = np.bincount((np.arange(G)[:, None] * (capacity + 1) + lengths).reshape(-1),
                     minlength=G * (capacity + 1)).reshape(G, capacity + 1)
  top = np.zeros(G, np.int64)
  bins = np.arange(width)
  for m in np.flatnonzero(hist[:, 1:].any(0))[::-1] + 1:   # decreasing lengths
    k = np.minimum(free // m, n)
    before = np.cumsum(k, axis=1) - k
    take = np.clip(hist[:, m, None] - before, 0, k)
    top = np.maximum(top, np.max(np.where(take > 0, bins, 0), axis=1))
    free -= take * m
  return top + 1


def pack(seqs: list[np.ndarray], lengths: np.ndarray, capacity: int, rows: int, pad_id: int):
  """Packs items group by group; all `seqs` share one layout.

  seqs: arrays [G, n, L] (e.g. the clean and the masked sentences; the first n tokens of item
  are real), lengths [G, n] -> (packed [G, rows, L] per seq, segment_ids [G, rows, L] (0 = pad,
  1.. = the item's number in its row, in item order), start [G, n] flat index of each item's
  first token in its group's rows x L grid), or None when some group needs more than `rows`
  rows. Vectorised: one scatter per array.
  """
  G, n = lengths.shape
  L = seqs[0].shape[-1]
  row, offset, used = first_fit_groups(lengths, capacity, rows)
  if n and used.max() > rows:
    return None
  start = row * L + offset
  # segment number: the item's rank among the items of its row, in item order
  slot = (np.arange(G)[:, None] * rows + row).reshape(-1)
  order = np.argsort(slot, kind="stable")
  ranks = np.arange(G * n)
  first = np.concatenate([[True], slot[order][1:] != slot[order][:-1]])[:G * n]
  rank = np.empty(G * n, np.int64)
  rank[order] = ranks - np.maximum.accumulate(np.where(first, ranks, 0))
  # token t of item (g, i) goes to flat position start[g, i] + t of group g
  m = lengths.reshape(-1).astype(np.int64)
  item = np.repeat(np.arange(G * n), m)
  t = np.arange(int(m.sum())) - np.repeat(np.cumsum(m) - m, m)
  group, dst = item // max(n, 1), start.reshape(-1)[item] + t
  out = []
  for s in seqs:
    grid = np.full((G, rows * L), pad_id, s.dtype)
    grid[group, dst] = s.reshape(G * n, L)[item, t]
    out.append(grid.reshape(G, rows, L))
  segment_ids = np.zeros((G, rows * L), np.int32)
  segment_ids[group, dst] = (rank + 1)[item]
  return out, segment_ids.reshape(G, rows, L), start


class Packer:
  """The packed layout of a pipeline: G = batch shards x micro-batches groups of `group_pairs`
  pairs, each packed into R rows (the sentence passes) and R2 rows (the TLM pair pass, or 0).

  The data.packing rules (rows at most one sequence per row, groups dividing the batch) are
  checked by the config's validation pass (config/validate.py), not here.
  """

  def __init__(self, *, global_batch: int, max_length: int, pad_id: int, mlm_input: str,
               packed_rows: int, packed_pair_rows: int, batch_shards: int, micro_batches: int,
               counters: collections.Counter):
    self.batch_shards, self.micro_batches = int(batch_shards), int(micro_batches)
    self.group_pairs = int(global_batch) // (self.batch_shards * self.micro_batches)
    self.max_length, self.pad_id, self.tlm = int(max_length), int(pad_id), mlm_input == "pair"
    self.packed_rows, self.packed_pair_rows = int(packed_rows), int(packed_pair_rows)
    self.rows_config = (self.packed_rows, self.packed_pair_rows)  # as configured (0 = auto)
    self.probe_result = None   # what the start-up probe measured (auto rows), for the log
    self.counters = counters   # packing fallback steps

  @property
  def needs_probe(self) -> bool:
    """Rows are chosen from the data (data.packed_rows / data.packed_pair_rows = 0)."""
    return not self.packed_rows or (self.tlm and not self.packed_pair_rows)

  @property
  def rows(self) -> tuple[int, int]:
    """(rows per packing group for the sentence passes, for the TLM pair pass or 0)."""
    return self.packed_rows, self.packed_pair_rows if self.tlm else 0

  @property
  def fallback_rows(self) -> tuple[int, int]:
    """Rows that always fit: one sequence per row (the padded layout's cost)."""
    return 2 * self.group_pairs, self.group_pairs if self.tlm else 0

  def local_groups(self, pairs: int, process_count: int) -> np.ndarray:
    """[G_local, g] this process's pairs by packing group."""
    if self.batch_shards % process_count:
      raise ConfigError(f"data.packing: the {self.batch_shards} batch shards do not split over "
                        f"{process_count} processes")
    return pairs_by_group(pairs, self.batch_shards // process_count, self.micro_batches)

  def pack(self, out: dict, lengths: np.ndarray, pair_lengths, process_count: int = 1,
           rows: tuple[int, int] | None = None) -> dict:
    """The padded batch `out` (sentence lengths [b, 2], TLM lengths [b] or None) packed group
    by group.

    A step whose sentences do not fit the rows of some group is never cut: the whole step
    (every group of this process) is packed into `fallback_rows`, one sequence per row, which
    always fits; it is counted (`packing fallback steps` in the report). With several processes
    every process must take the same rows: the pipeline passes those of `agree`, which fit.
    """
    groups = self.local_groups(lengths.shape[0], process_count)
    G, g = groups.shape
    want = self.rows if rows is None else rows
    by_group = lambda a: a[groups].reshape((G, 2 * g) + a.shape[2:])
    seq_keys = ["input_ids"] + (["mlm_input_ids"] if "mlm_input_ids" in out and
                                not self.tlm else [])
    packed = pack([by_group(out[k]) for k in seq_keys], by_group(lengths), self.max_length,
                  want[0], self.pad_id)
    pair = None
    if self.tlm:
      pair = pack([out["mlm_input_ids"][groups]], pair_lengths[groups], self.max_length,
                  want[1], self.pad_id)
    if packed is None or (self.tlm and pair is None):
      if rows is not None and tuple(rows) == self.fallback_rows:
        raise AssertionError("the fallback layout always fits")  # one sequence per row
      self.counters["packing_fallback_steps"] += 1
      return self.pack(out, lengths, pair_lengths, process_count, self.fallback_rows)
    return self._assemble(out, groups, seq_keys, packed, pair)

  @staticmethod
  def _assemble(out: dict, groups: np.ndarray, seq_keys: list, packed, pair) -> dict:
    """The packed batch from the packed grids; [CLS] and MLM positions as flat grid indices."""
    G, g = groups.shape
    b = G * g
    arrays, segment_ids, start = packed
    res = {k: a for k, a in zip(seq_keys, arrays)}
    res["token_type_ids"] = np.zeros_like(segment_ids)
    res["segment_ids"] = segment_ids
    res["attention_mask"] = (segment_ids > 0).astype(np.int32)
    cls_index = np.zeros((b, 2), np.int32)
    cls_index[groups.reshape(-1)] = start.reshape(G * g, 2)
    res["cls_index"] = cls_index
    if pair is None:  # MLM positions of each sentence, in its group's grid
      res["mlm_positions"] = (cls_index[..., None] + out["mlm_positions"]).astype(np.int32)
    else:
      (pair_ids,), pair_segments, pair_start = pair
      pair_first = np.zeros(b, np.int64)
      pair_first[groups.reshape(-1)] = pair_start.reshape(-1)
      res.update(mlm_input_ids=pair_ids, mlm_segment_ids=pair_segments,
                 mlm_attention_mask=(pair_segments > 0).astype(np.int32),
                 mlm_positions=(pair_first[:, None] + out["mlm_positions"]).astype(np.int32))
    for k in ("mlm_ids", "mlm_weights", "text_hash"):
      res[k] = out[k]
    return res

  def agree(self, lengths: np.ndarray) -> tuple[int, int]:
    """The rows every process packs a step into, from the token counts [B, 2] (uncut, without
    [CLS]/[SEP]) of the whole global batch: the configured rows when every group of every
    process fits them, else the fallback (counted). Integers only, the same on every process:
    no collective agrees on the global shape."""
    groups = pairs_by_group(lengths.shape[0], self.batch_shards, self.micro_batches)
    L, half = self.max_length, (self.max_length - 4) // 2
    R, R2 = self.rows
    sentences = (np.minimum(lengths, L - 2) + 2)[groups].reshape(len(groups), -1)
    fits = rows_needed(sentences, L, R).max() <= R
    if fits and self.tlm:
      pair = np.minimum(lengths, half).sum(1) + 4
      fits = rows_needed(pair[groups], L, R2).max() <= R2
    if fits:
      return self.rows
    self.counters["packing_fallback_steps"] += 1
    return self.fallback_rows

  def choose_rows(self, lengths: list[np.ndarray]) -> None:
    """Auto rows (data.packed_rows=0) from the sentence lengths [B, 2] (without [CLS]/[SEP])
    of the global batches of the first steps of the stream: the most rows any of their groups
    needs (a later step needing more takes the counted fallback). Deterministic: a function of
    the data and the config, the same on every process."""
    B = lengths[0].shape[0]
    groups = pairs_by_group(B, self.batch_shards, self.micro_batches)
    L, half = self.max_length, (self.max_length - 4) // 2
    need, need_pair, real = [], [], 0
    for n in lengths:
      real += int((n + 2).sum())
      need += list(rows_needed((n + 2)[groups].reshape(len(groups), -1), L))
      pair = np.minimum(n, half).sum(1) + 4
      need_pair += list(rows_needed(pair[groups], L))
    most, most_pair = self.fallback_rows
    if not self.packed_rows:
      self.packed_rows = min(most, max(need))
    if self.tlm and not self.packed_pair_rows:
      self.packed_pair_rows = min(most_pair, max(need_pair))
    self.probe_result = {
        "steps": len(lengths), "groups": len(need), "sentences_per_group": 2 * self.group_pairs,
        "mean_tokens_per_sentence": real / (2 * B * len(lengths)),
        "rows_needed_max": int(max(need)), "rows_needed_mean": float(np.mean(need)),
        **({"pair_rows_needed_max": int(max(need_pair))} if self.tlm else {})}

  def summary(self) -> str:
    """One log line: the packed layout and what it saves."""
    R, R2 = self.rows
    G = self.batch_shards * self.micro_batches
    line = (f"packing: {G} groups of {self.group_pairs} pairs, each {2 * self.group_pairs} "
            f"sentences in {R} rows of {self.max_length} tokens")
    if R2:
      line += f", TLM pair sequences in {R2} rows"
    line += f" ({2 * self.group_pairs / R:.1f}x fewer rows than padded)"
    p = self.probe_result
    if p:
      line += (f"; rows chosen from {p['groups']} groups of the first {p['steps']} steps: "
               f"{p['mean_tokens_per_sentence']:.1f} tokens per sentence, rows needed "
               f"mean {p['rows_needed_mean']:.1f} max {p['rows_needed_max']}")
    return line
