"""Weighted mixtures of language-pair components, sampled as a pure function of the step.

Component c is drawn with probability p_c ∝ w_c · n_c^(1/T): T=1 follows corpus sizes,
larger T flattens towards uniform over language pairs (XLM-R's temperature sampling), and
w_c is the weight of the source the component came from.

Statelessness: the number of rows each component gets at a step is a multinomial draw seeded
by (seed, block) for blocks of 256 steps, so the number of draws a component has had before
any step is a cumulative sum -- no iterator state. Draw j of component c is element
j mod n_c of a seeded permutation for epoch j // n_c: every pair is seen once per epoch of
its component, in a fresh order each epoch.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from bepa_jax.errors import ConfigError

BLOCK = 256


def mixture_probs(sizes: Sequence[int], weights: Sequence[float], temperature: float):
  if not temperature > 0:
    raise ConfigError(f"data.temperature must be > 0, got {temperature}")
  sizes = np.asarray(sizes, np.float64)
  p = np.asarray(weights, np.float64) * np.power(sizes, 1.0 / float(temperature))
  p[sizes == 0] = 0.0
  if not p.sum() > 0:
    raise ConfigError("the data mixture is empty: no component has pairs")
  return p / p.sum()


class Mixture:
  """(component, index) of every row of every global batch, from (seed, step) alone."""

  def __init__(self, sizes: Sequence[int], weights: Sequence[float], temperature: float,
               global_batch: int, seed: int, cache_epochs: int = 4):
    self.sizes = np.asarray(sizes, np.int64)
    self.probs = mixture_probs(self.sizes, weights, temperature)
    self.global_batch = int(global_batch)
    self.seed = int(seed)
    self._block_cum = [np.zeros(len(self.sizes), np.int64)]  # draws before block k
    self._perms: OrderedDict = OrderedDict()
    self._cache_epochs = cache_epochs
    self._last_counts = (-1, None)

  def _counts(self, block: int) -> np.ndarray:
    """[BLOCK, C] rows per component for each step of `block` (the last block kept)."""
    if self._last_counts[0] != block:
      rng = np.random.default_rng([self.seed, 10, block])
      self._last_counts = (block, rng.multinomial(self.global_batch, self.probs,
                                                  size=BLOCK).astype(np.int64))
    return self._last_counts[1]

  def _draws_before(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(draws of each component before `step`, rows of each component at `step`)."""
    block, k = divmod(int(step), BLOCK)
    while len(self._block_cum) <= block:   # grows once; resuming at step s costs s/256 draws
      b = len(self._block_cum) - 1
      self._block_cum.append(self._block_cum[-1] + self._counts(b).sum(0))
    counts = self._counts(block)
    return self._block_cum[block] + counts[:k].sum(0), counts[k]

  def _perm(self, c: int, epoch: int) -> np.ndarray:
    key = (c, epoch)
    if key not in self._perms:
      self._perms[key] = np.random.default_rng([self.seed, 11, c, epoch]).permutation(
          int(self.sizes[c]))
      while len(self._perms) > self._cache_epochs * max(len(self.sizes), 1):
        self._perms.popitem(last=False)
    self._perms.move_to_end(key)
    return self._perms[key]

  def example(self, c: int, draw: int) -> int:
    epoch, k = divmod(int(draw), int(self.sizes[c]))
    return int(self._perm(c, epoch)[k])

  def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(component [B], example index [B]) of the global batch at `step` (vectorised: one
    gather per component and epoch)."""
    before, counts = self._draws_before(step)
    comps, idx = [], []
    for c in np.nonzero(counts)[0]:
      epoch, k = np.divmod(before[c] + np.arange(counts[c]), self.sizes[c])
      out = np.empty(len(k), np.int64)
      for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = self._perm(int(c), int(e))[k[sel]]
      comps.append(np.full(len(k), c, np.int64))
      idx.append(out)
    order = np.random.default_rng([self.seed, 12, int(step)]).permutation(self.global_batch)
    return np.concatenate(comps)[order], np.concatenate(idx)[order]

  def epoch_of(self, step: int) -> np.ndarray:
    """Epochs completed by each component before `step` (for logging)."""
    before, _ = self._draws_before(step)
    return before / np.maximum(self.sizes, 1)
