"""Bitext retrieval: Tatoeba (XTREME protocol, LASER file layout) and any line-aligned files.

Tatoeba: `tatoeba.xxx-eng.xxx` and `tatoeba.xxx-eng.eng`, 1,000 aligned pairs per language.
For each sentence the nearest neighbour (cosine, or a BUCC margin score) among all sentences of
the other side must be its translation; accuracy is reported in both directions (XTREME
reports xxx->eng).
"""
from __future__ import annotations

import dataclasses
import gzip
import itertools
import os
import re
import zlib
from typing import Sequence

import numpy as np

from bepa_jax.errors import InputError
from bepa_jax.eval import metrics


@dataclasses.dataclass(frozen=True)
class ParallelSet:
  """texts[j][i] is sentence i in languages[j]; all columns are line-aligned."""
  name: str
  languages: tuple[str, ...]
  texts: tuple[tuple[str, ...], ...]

  def __len__(self):
    return len(self.texts[0]) if self.texts else 0

  def pairs(self):
    """Language index pairs (i, j), i < j, that are scored."""
    return list(itertools.combinations(range(len(self.languages)), 2))


def read_lines(path: str) -> list[str]:
  """Lines of a text file (.gz read transparently), newline stripped."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: file not found")
  from bepa_jax.data.text_files import check_first_line
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
    lines = check_first_line(path, raw).decode("utf-8").split("\n")
    return [l.rstrip("\r") for l in (lines[:-1] if lines[-1] == "" else lines)]
  except (UnicodeDecodeError, OSError, EOFError, zlib.error) as e:
    raise InputError(f"{path}: cannot read as UTF-8 text ({e})") from None


def _aligned(name: str, languages, paths, max_sentences: int | None) -> ParallelSet:
  columns = [read_lines(p) for p in paths]
  n = len(columns[0])
  for p, col in zip(paths, columns):
    if len(col) != n:
      raise InputError(f"{p}: {len(col)} lines, but {paths[0]} has {n}: files must be "
                       f"line-aligned")
  if n < 2:
    raise InputError(f"{paths[0]}: need at least 2 aligned lines for retrieval, got {n}")
  if max_sentences:
    columns = [c[:int(max_sentences)] for c in columns]
  return ParallelSet(name, tuple(languages), tuple(tuple(c) for c in columns))


def tatoeba_languages(tatoeba_dir: str) -> list[str]:
  """Languages with both files present, e.g. ['afr', 'amh', ...]."""
  if not os.path.isdir(tatoeba_dir):
    raise InputError(f"{tatoeba_dir}: Tatoeba directory not found")
  found = set()
  for name in os.listdir(tatoeba_dir):
    m = re.fullmatch(r"tatoeba\.([a-z]+)-eng\.\1", name)
    if m and os.path.isfile(os.path.join(tatoeba_dir, f"tatoeba.{m.group(1)}-eng.eng")):
      found.add(m.group(1))
  return sorted(found)


def read_tatoeba(tatoeba_dir: str, lang: str, max_sentences: int | None = None) -> ParallelSet:
  base = os.path.join(tatoeba_dir, f"tatoeba.{lang}-eng")
  if not os.path.isfile(f"{base}.{lang}"):
    have = tatoeba_languages(tatoeba_dir)
    raise InputError(f"{base}.{lang}: no Tatoeba file for language '{lang}' "
                     f"({len(have)} languages in {tatoeba_dir})")
  return _aligned(f"tatoeba/{lang}", (lang, "eng"), [f"{base}.{lang}", f"{base}.eng"],
                  max_sentences)


def read_tatoeba_tfds(lang: str, max_sentences: int | None = None,
                      data_dir: str | None = None) -> ParallelSet:
  """TFDS `tatoeba/tatoeba_<lang>` (XTREME's copy; 2-letter codes, e.g. de), read through
  `tfds.data_source` (array_record, no TensorFlow). Records that cannot be used are dropped."""
  from bepa_jax.data import sources, tfds_sources
  comps = tfds_sources.tfds_components(f"tatoeba/tatoeba_{lang}", "train", sources.TextPolicy(),
                                       data_dir=data_dir)
  if not comps:
    raise InputError(f"tfds:tatoeba/tatoeba_{lang}: no sentence pairs")
  c = comps[0]
  rows = [r for r in (c[i] for i in range(len(c))) if r is not None]
  if max_sentences:
    rows = rows[:int(max_sentences)]
  if len(rows) < 2:
    raise InputError(f"tfds:tatoeba/tatoeba_{lang}: need at least 2 pairs, got {len(rows)}")
  return ParallelSet(f"tatoeba/{lang}", (c.lang_x, c.lang_y),
                     (tuple(r[0] for r in rows), tuple(r[1] for r in rows)))


def language_of(path: str) -> str:
  """'test_2016_flickr.de.gz' -> 'de' (the last suffix, .gz dropped)."""
  base = os.path.basename(path)
  if base.endswith(".gz"):
    base = base[:-3]
  suffix = os.path.splitext(base)[1].lstrip(".")
  return suffix or base


def read_parallel(paths: Sequence[str], max_sentences: int | None = None,
                  name: str = "parallel") -> ParallelSet:
  """Two or more line-aligned files; each one's language is its last suffix (a.de -> de)."""
  if len(paths) < 2:
    raise InputError(f"--parallel needs at least 2 aligned files, got {list(paths)}")
  langs = [language_of(p) for p in paths]
  if len(set(langs)) != len(langs):  # same suffix twice: fall back to the file names
    langs = [os.path.basename(p) for p in paths]
  return _aligned(name, langs, list(paths), max_sentences)


# ----------------------------------------------------------------------------- scoring
def score_set(ps: ParallelSet, embeddings: dict, poolings=("cls", "mean"), margin: str | None = None,
              k: int = 4) -> dict:
  """{"a-b": {"cls": {"a->b": acc, "b->a": acc}, "cls+ratio": {...}, ...}} for each pair."""
  out = {}
  for i, j in ps.pairs():
    a, b = ps.languages[i], ps.languages[j]
    entry = {}
    for pool in poolings:
      zx, zy = embeddings[a][pool], embeddings[b][pool]
      scorings = [(pool, None)] + ([(f"{pool}+{margin}", margin)] if margin else [])
      for key, mode in scorings:
        acc = metrics.retrieval_accuracy(zx, zy, margin=mode, k=k)
        entry[key] = {f"{a}->{b}": acc["x2y"], f"{b}->{a}": acc["y2x"]}
    out[f"{a}-{b}"] = entry
  return out


def tatoeba_summary(per_lang: dict) -> dict:
  """Mean over languages of xx->eng and eng->xx accuracy, per scoring."""
  avg: dict = {}
  for lang, entry in per_lang.items():
    for scoring, acc in entry[f"{lang}-eng"].items():
      d = avg.setdefault(scoring, {"xx->eng": [], "eng->xx": []})
      d["xx->eng"].append(acc[f"{lang}->eng"])
      d["eng->xx"].append(acc[f"eng->{lang}"])
  return {s: {k: float(np.mean(v)) for k, v in d.items()} for s, d in avg.items()}
