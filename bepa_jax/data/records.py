"""The records every data source shares: a language pair's rows, the text policy, load stats.

A module of its own so that the source readers (sources.py for files, tfds_sources.py for
TFDS) both build on it without importing each other.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

from bepa_jax.errors import ConfigError


@dataclasses.dataclass
class LoadStats:
  """What was dropped or changed while reading: reported in the log, never silent."""
  empty: int = 0              # pairs dropped because a side was empty
  long_skipped: int = 0       # pairs dropped because a side had more than max_chars
  long_truncated: int = 0     # sides cut to max_chars
  invalid_utf8: int = 0       # pairs dropped because a line was not UTF-8
  nul_lines: int = 0          # lines kept with their NUL bytes dropped (text_files.py)

  def add(self, other: "LoadStats"):
    for f in dataclasses.fields(self):
      setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

  def report(self) -> str:
    labels = {"nul_lines": "lines cleared of NUL bytes"}
    parts = [f"{v} {labels.get(k, k.replace('_', ' '))}"
             for k, v in dataclasses.asdict(self).items() if v]
    return ", ".join(parts) if parts else "nothing skipped"


@dataclasses.dataclass(frozen=True)
class TextPolicy:
  """How bad lines are handled (data.max_chars, data.long_lines, data.invalid_utf8)."""
  max_chars: int = 2000
  long_lines: str = "skip"        # skip | truncate
  invalid_utf8: str = "error"     # error | skip

  def __post_init__(self):
    if self.long_lines not in ("skip", "truncate"):
      raise ConfigError(f"data.long_lines={self.long_lines!r} is not one of skip, truncate")
    if self.invalid_utf8 not in ("error", "skip"):
      raise ConfigError(f"data.invalid_utf8={self.invalid_utf8!r} is not one of error, skip")
    if self.max_chars < 1:
      raise ConfigError(f"data.max_chars must be >= 1, got {self.max_chars}")

  @classmethod
  def from_config(cls, data_cfg) -> "TextPolicy":
    return cls(int(data_cfg.max_chars), str(data_cfg.long_lines), str(data_cfg.invalid_utf8))

  def clean(self, texts: Sequence[str | None], stats: LoadStats) -> tuple[str, ...] | None:
    """The row's texts, cleaned; None (counted) when the row must be dropped."""
    if any(t is None for t in texts):
      stats.invalid_utf8 += 1
      return None
    texts = tuple(t.strip() for t in texts)
    if any(not t for t in texts):
      stats.empty += 1
      return None
    if any(len(t) > self.max_chars for t in texts):
      if self.long_lines == "skip":
        stats.long_skipped += 1
        return None
      stats.long_truncated += sum(len(t) > self.max_chars for t in texts)
      texts = tuple(t[:self.max_chars] for t in texts)
    return texts


class Component:
  """One language pair of one source: random access to (text_x, text_y)."""
  source: str
  lang_x: str
  lang_y: str
  monolingual = False        # MLM-only rows (two sentences of one language)
  in_memory = True           # its texts are held in memory (False: read on access)
  stats: LoadStats | None = None  # what a lazy reader dropped so far (read on access)

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, i: int) -> tuple[str, str]:
    raise NotImplementedError

  def group(self, i: int):
    """What row i shares with rows of sibling components (its meaning in a multi-way
    source), or None. Two rows of one group in a batch are false negatives: dedup redraws."""
    return None

  @property
  def name(self) -> str:
    return f"{self.source}:{self.lang_x}-{self.lang_y}"

  def __repr__(self):
    return f"<{self.name} {len(self)} pairs>"


def select_pairs(languages: Sequence[str], pairs: Sequence[tuple[str, str]] | None):
  """Unordered language pairs of a multi-way source, in source order, filtered by `pairs`."""
  out = list(itertools.combinations(languages, 2))
  if pairs:
    wanted = {frozenset(p) for p in pairs}
    out = [p for p in out if frozenset(p) in wanted]
  return out
