"""Which pairs make up a global batch: the mixture's plan, with bad and duplicate rows redrawn.

The plan of a stream position (the train step minus the step at which the stream started) is
a pure function of the position and the seed (data/mixture.py), so every process computes the
same global plan and resuming needs nothing but the step.

Duplicates: two pairs of one batch sharing a sentence on either side, or a meaning (a row of
a multi-way source such as the embedded corpus, in two language pairs), are false negatives
for InfoNCE. With `dedup` on, each process reads the *texts* of the whole global batch
(cheap: B record reads, no tokenisation), and a row whose sentence already occurred -- or
whose record is unusable (empty, too long, not UTF-8) -- is redrawn from the same component
with a seed of (position, row, attempt). With `dedup` off a process reads only its own rows.
"""
from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from bepa_jax.data.mixture import Mixture
from bepa_jax.data.records import Component
from bepa_jax.errors import ConfigError, InputError

MAX_ATTEMPTS = 64


class Plan:
  """(component, record, texts, side swap) of every row of the global batch at a position."""

  def __init__(self, components: Sequence[Component], weights: Sequence[float], *,
               temperature: float, global_batch: int, seed: int, dedup: bool,
               counters: collections.Counter):
    if not components:
      raise ConfigError("data.source yields no language pairs")
    mono = [c.monolingual for c in components]
    if any(mono) and not all(mono):
      raise ConfigError("data.source mixes mono: with parallel sources: MLM-only rows would "
                        "be negatives of the contrastive loss; use them alone with loss.weight=0")
    self.mlm_only = all(mono)
    self.components = list(components)
    self.global_batch, self.seed, self.dedup = int(global_batch), int(seed), bool(dedup)
    self.mixture = Mixture([len(c) for c in components], weights, temperature, global_batch,
                           seed)
    self.counters = counters  # replaced duplicates / unusable records
    self._resolved = None

  @property
  def probs(self) -> dict[str, float]:
    return {c.name: float(p) for c, p in zip(self.components, self.mixture.probs)}

  def forget(self) -> None:
    """Drops the cached plan (its next resolve counts its replacements again)."""
    self._resolved = None

  def _redraw(self, position, row, c, attempt):
    rng = np.random.default_rng([self.seed, 13, int(position), int(row), attempt])
    return int(rng.integers(len(self.components[c])))

  def resolve(self, position: int, rows: range | None = None):
    """(component [B], index [B], texts {row: (x, y)}, swap [B]) after replacing bad/duplicate
    rows; swap: the row's sides are exchanged (x and y languages are balanced).

    With dedup every row of the global batch is resolved (in global order); otherwise only
    `rows`, each on its own, which gives the same result for those rows.
    """
    position = int(position)
    key = (position, None if self.dedup else (rows.start, rows.stop) if rows else None)
    if self._resolved and self._resolved[0] == key:
      return self._resolved[1]
    comps, idx = self.mixture.plan(position)
    todo = range(self.global_batch) if self.dedup or rows is None else rows
    seen, groups, texts = set(), set(), {}
    for r in todo:
      c = int(comps[r])
      for attempt in range(MAX_ATTEMPTS):
        pair = self.components[c][int(idx[r])]
        group = self.components[c].group(int(idx[r]))
        if pair is None:
          self.counters["unusable_replaced"] += 1
        elif self.dedup and (pair[0] in seen or pair[1] in seen or group in groups):
          self.counters["duplicates_replaced"] += 1
        else:
          break
        idx[r] = self._redraw(position, r, c, attempt)
      else:
        raise InputError(f"{self.components[c].name}: no usable, non-duplicate pair found for "
                         f"row {r} of step {position} after {MAX_ATTEMPTS} draws (component too "
                         f"small for train.global_batch={self.global_batch}, or mostly bad "
                         f"records; data.dedup=False allows duplicates)")
      if self.dedup:
        seen.update(pair)
        if group is not None:
          groups.add(group)
      texts[r] = pair
    swap = np.random.default_rng([self.seed, 14, position]).random(self.global_batch) < 0.5
    if self.mlm_only:
      swap[:] = False
    out = (comps, idx, texts, swap)
    self._resolved = (key, out)
    return out

  def flat_texts(self, position: int, rows: range) -> list[str]:
    """x, y, x, y, ... of `rows` in their (swapped) side order."""
    _, _, texts, swap = self.resolve(position, rows)
    flat = []
    for r in rows:
      x, y = texts[r]
      flat += [y, x] if swap[r] else [x, y]
    return flat

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
