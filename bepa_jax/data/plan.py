"""Which pairs make up a global batch: the mixture's plan, with bad and duplicate rows redrawn.

The plan of a stream position (the train step minus the step at which the stream started) is
a pure function of the position and the seed (data/mixture.py), so every process computes the
same global plan and resuming needs nothing but the step.

Duplicates: two pairs of one batch sharing a sentence on either side, or a meaning (a row of
a multi-way source such as the embedded corpus, in two language pairs), are false negatives
for InfoNCE. The plan works on integers only (data/table.py: per record its text keys, meaning
and token counts, computed once), so every process resolves the whole global batch in a few
vectorised passes without reading a single text; a host then reads (or takes from the record
store) only its own rows. The rule, in rounds k = 0, 1, ... (at most MAX_ATTEMPTS):

  * every unresolved row has a candidate record: round 0 the mixture's, round k a uniform draw
    from the row's component seeded by (seed, position, k) -- the same for any process count;
  * a candidate is rejected when its record is unusable (empty, too long, not UTF-8), or (with
    dedup) when a sentence or meaning of it is already held by an accepted row, or when a row
    with a lower index has a candidate in this round sharing a sentence or meaning with it
    (itself not rejected by the first two tests);
  * the others are accepted; the rejected rows go on to the next round.

So no sentence or meaning occurs twice in the global batch, and the row order decides ties.
(Plan version 1, before this rule, redrew row by row in Python: other batches whenever a row
was redrawn; `PLAN_VERSION` is part of the stream identity.)
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from bepa_jax.data import table as table_lib
from bepa_jax.data.mixture import Mixture
from bepa_jax.data.records import Component
from bepa_jax.errors import ConfigError, InputError

MAX_ATTEMPTS = 64
PLAN_VERSION = 2


class RowTexts:
  """The (x, y) texts of resolved rows, read on access: a host reads only the rows it uses."""

  def __init__(self, components: Sequence[Component], comps, idx, read: dict):
    self.components, self.comps, self.idx, self.read = components, comps, idx, read

  def __getitem__(self, r: int) -> tuple[str, str]:
    key = (int(self.comps[r]), int(self.idx[r]))
    if key not in self.read:
      self.read[key] = self.components[key[0]][key[1]]
    return self.read[key]


class Plan:
  """(component, record, texts, side swap) of every row of the global batch at a position."""

  def __init__(self, components: Sequence[Component], weights: Sequence[float], *,
               temperature: float, global_batch: int, seed: int, dedup: bool,
               counters: collections.Counter, table: table_lib.Table | None = None):
    if not components:
      raise ConfigError("data.source yields no language pairs")
    mono = [c.monolingual for c in components]
    if any(mono) and not all(mono):
      raise ConfigError("data.source mixes mono: with parallel sources: MLM-only rows would "
                        "be negatives of the contrastive loss; use them alone with loss.weight=0")
    self.mlm_only = all(mono)
    self.components = list(components)
    self.global_batch, self.seed, self.dedup = int(global_batch), int(seed), bool(dedup)
    self.sizes = np.array([len(c) for c in components], np.int64)
    self.mixture = Mixture(self.sizes, weights, temperature, global_batch, seed)
    self.counters = counters  # replaced duplicates / unusable records
    # dedup compares every row's keys: without a table (data/table.py) one is read now
    self.table = table if table is not None or not dedup else table_lib.scan(components)
    self._resolved = None
    self._read: dict = {}   # records read while resolving without a table (lazy sources)

  @property
  def probs(self) -> dict[str, float]:
    return {c.name: float(p) for c, p in zip(self.components, self.mixture.probs)}

  def forget(self) -> None:
    """Drops the cached plan (its next resolve counts its replacements again)."""
    self._resolved = None

  def resolve(self, position: int, rows: range | None = None):
    """(component [B], index [B], texts {row: (x, y)} read on access, swap [B]) after
    replacing bad/duplicate rows; swap: the row's sides are exchanged (x and y languages are
    balanced).

    With a table every row of the global batch is resolved (integers only); without one
    (dedup off, no packing: a lazy source's records are read to see if they are usable) only
    `rows`, each on its own, which gives the same result for those rows.
    """
    position = int(position)
    local = self.table is None and rows is not None
    key = (position, (rows.start, rows.stop) if local else None)
    if self._resolved and self._resolved[0] == key:
      return self._resolved[1]
    if self._resolved is None or self._resolved[0][0] != position:
      self._read = {}
    comps, idx = self.mixture.plan(position)
    todo = np.arange(rows.start, rows.stop) if local else np.arange(self.global_batch)
    self._redraw(position, comps, idx, todo)
    swap = np.random.default_rng([self.seed, 14, position]).random(self.global_batch) < 0.5
    if self.mlm_only:
      swap[:] = False
    out = (comps, idx, RowTexts(self.components, comps, idx, self._read), swap)
    self._resolved = (key, out)
    return out

  def _redraw(self, position: int, comps: np.ndarray, idx: np.ndarray, todo: np.ndarray):
    """Replaces, in place, the records of rows `todo` that are unusable or duplicates (the
    rule in the module docstring)."""
    held = np.zeros(0, np.int64)   # the keys of the accepted rows, sorted
    for attempt in range(MAX_ATTEMPTS):
      if attempt:
        draw = np.random.default_rng([self.seed, 13, position, attempt]).integers(
            0, self.sizes[comps])
        idx[todo] = draw[todo]
      usable = self._usable(comps[todo], idx[todo])
      self.counters["unusable_replaced"] += int((~usable).sum())
      rest = todo[usable]
      if self.dedup:
        win, held = self._unique(self.table.flat(comps[rest], idx[rest]), held)
        self.counters["duplicates_replaced"] += int((~win).sum())
        rest = rest[win]
      todo = np.setdiff1d(todo, rest, assume_unique=True)
      if not len(todo):
        return
    r = int(todo[0])
    raise InputError(f"{self.components[comps[r]].name}: no usable, non-duplicate pair found "
                     f"for row {r} of step {position} after {MAX_ATTEMPTS} draws (component "
                     f"too small for train.global_batch={self.global_batch}, or mostly bad "
                     f"records; data.dedup=False allows duplicates)")

  def _usable(self, comps: np.ndarray, idx: np.ndarray) -> np.ndarray:
    if self.table is not None:
      return self.table.usable(self.table.flat(comps, idx))
    out = np.zeros(len(comps), bool)
    for j, key in enumerate(zip(comps.tolist(), idx.tolist())):
      if key not in self._read:
        self._read[key] = self.components[key[0]][key[1]]
      out[j] = self._read[key] is not None
    return out

  def _unique(self, flat: np.ndarray, held: np.ndarray):
    """Candidates (records `flat`, in row order) -> (accepted mask, the keys now held, sorted):
    a candidate loses if one of its keys is held already, or is shared with an earlier
    candidate that is not held already."""
    n = len(flat)
    keys = self.table.keys_of(flat)                      # texts: >= 0
    meanings = self.table.meanings_of(flat)
    if meanings is not None:                             # meanings: <= -2, apart from texts
      keys = np.concatenate([keys, -2 - meanings[:, None]], axis=1)  # no meaning: -1
    width = keys.shape[1]
    entries = keys.reshape(-1)
    owner = np.repeat(np.arange(n), width)               # ascending
    real = entries != -1
    entries, owner = entries[real], owner[real]
    at = np.minimum(np.searchsorted(held, entries), max(len(held) - 1, 0))
    lose = np.zeros(n, bool)
    if len(held):
      lose[owner[held[at] == entries]] = True
    live = ~lose[owner]
    e, o = entries[live], owner[live]
    order = np.argsort(e, kind="stable")                 # by key, then row (stable)
    e, o = e[order], o[order]
    first = np.ones(len(e), bool)
    first[1:] = e[1:] != e[:-1]
    lose[o[o != o[first][np.cumsum(first) - 1]]] = True  # not the earliest holder of a key
    win = ~lose
    return win, np.sort(np.concatenate([held, entries[win[owner]]]), kind="stable")

  def lengths(self, position: int) -> np.ndarray:
    """[B, 2] token counts (uncut) of every row of the global batch, in its side order."""
    comps, idx, _, swap = self.resolve(position)
    n = self.table.lengths_of(self.table.flat(comps, idx))
    n[swap] = n[swap, ::-1]
    return n

  def flat_texts(self, position: int, rows: range) -> list[str]:
    """x, y, x, y, ... of `rows` in their (swapped) side order."""
    _, _, texts, swap = self.resolve(position, rows)
    flat = []
    for r in rows:
      x, y = texts[r]
      flat += [y, x] if swap[r] else [x, y]
    return flat

  def flat_keys(self, position: int, rows: range) -> np.ndarray:
    """[2 * len(rows)] text keys of `rows` (x, y, x, y, ...) in their side order."""
    comps, idx, _, swap = self.resolve(position, rows)
    sel = np.arange(rows.start, rows.stop)
    keys = self.table.keys_of(self.table.flat(comps[sel], idx[sel]))
    keys[swap[sel]] = keys[swap[sel], ::-1]
    return keys.reshape(-1)

  def languages(self, position: int) -> list[tuple[str, str]]:
    comps, _, _, swap = self.resolve(position)
    out = []
    for c, s in zip(comps, swap):
      lx, ly = self.components[c].lang_x, self.components[c].lang_y
      out.append((ly, lx) if s else (lx, ly))
    return out

  def texts(self, position: int) -> list[tuple[str, str]]:
    _, _, texts, swap = self.resolve(position)
    return [(texts[r][1], texts[r][0]) if swap[r] else texts[r]
            for r in range(self.global_batch)]
