"""Parallel-text sources read from files, as random-access language-pair components.

A *component* is one language pair of one source: `len(c)` pairs, `c[i] -> (text_x, text_y)`,
`c.lang_x`, `c.lang_y`. Random access (not a stream) is what lets the pipeline compute any
step's global batch from the step alone. Small files are read into host memory once; plain
aligned files over LAZY_BYTES get a line-offset index instead and are read line by line
(text_files.py; gzip cannot seek, so it is always loaded: decompress big corpora or use TFDS array_record,
tfds_sources.py, which is also read record by record).

Source specs (`data.source`, `bepa-tokenizer train --input`), `;`-separated, `@W` = weight:
  aligned:PREFIX.{en,de,fr}     Moses/OPUS files PREFIX.en, PREFIX.de ... (plain or .gz)
  tatoeba:DIR[:deu,fra]         LASER/XTREME DIR/tatoeba.xxx-eng.{xxx,eng} (all, or listed xxx)
  tsv:PATH                      header = language codes (multi-way), or
                                header `lang_x<TAB>text_x<TAB>lang_y<TAB>text_y` (a pair per line)
  jsonl:PATH                    {"en": .., "de": ..} or {"lang_x","text_x","lang_y","text_y"}
  tfds:NAME[:SPLIT]             a TFDS array_record dataset (see tfds_sources.py)
  mono:LANG=PATH                monolingual text, for MLM-only batches (loss.weight=0)
  embedded[:en,de,fr]           the bundled multi-way corpus (bepa_jax/resources), in the
                                listed languages (default: data.languages)
"""
from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import logging
import math
import os
import re
from typing import Iterator, Sequence

import numpy as np

from bepa_jax.data import tfds_sources
from bepa_jax.data.records import (  # noqa: F401  (re-exported: sources.Component, ...)
    Component, LoadStats, TextPolicy, select_pairs)
from bepa_jax.data.text_files import IndexedLines, read_lines
from bepa_jax.errors import ConfigError, InputError

log = logging.getLogger("bepa")


# ----------------------------------------------------------------------------- components
class ColumnPair(Component):
  """A pair of columns of an in-memory multi-way table (rows where both sides are usable)."""

  def __init__(self, source: str, lang_x: str, lang_y: str, xs: Sequence[str],
               ys: Sequence[str], rows: Sequence[int] | None = None):
    self.source, self.lang_x, self.lang_y = source, lang_x, lang_y
    self.xs, self.ys, self.rows = xs, ys, rows

  def group(self, i):
    return None if self.rows is None else (self.source, self.rows[i])

  def __len__(self):
    return len(self.xs)

  def __getitem__(self, i):
    return self.xs[i], self.ys[i]


class Monolingual(Component):
  """MLM-only rows: two different sentences of one language (x = line i, y = line i + n/2)."""
  monolingual = True

  def __init__(self, source: str, lang: str, lines: Sequence[str]):
    self.source, self.lang_x, self.lang_y = source, lang, lang
    self.lines, self.half = lines, len(lines) // 2

  def __len__(self):
    return self.half

  def __getitem__(self, i):
    return self.lines[i], self.lines[i + self.half]


def multiway_components(source: str, languages: Sequence[str], columns: Sequence[Sequence],
                        policy: TextPolicy, stats: LoadStats, pairs=None) -> list[Component]:
  """Columns of aligned text -> one component per language pair (bad cells counted once)."""
  rows = []
  for row in zip(*columns):
    # a multi-way row may miss one language and still serve the others: clean per cell
    cells = []
    for t in row:
      s = LoadStats()
      cleaned = policy.clean((t,), s)
      stats.add(s)
      cells.append(cleaned[0] if cleaned else None)
    rows.append(cells)
  out = []
  for lx, ly in select_pairs(languages, pairs):
    i, j = languages.index(lx), languages.index(ly)
    keep = [k for k, r in enumerate(rows) if r[i] is not None and r[j] is not None]
    if keep:  # the row number is the meaning: one per batch across all pairs (dedup)
      out.append(ColumnPair(source, lx, ly, [rows[k][i] for k in keep],
                            [rows[k][j] for k in keep], keep))
  return out


# ----------------------------------------------------------------------------- readers
def resolve_path(path: str) -> str:
  """`path`, or `path.gz` when only that exists (Moses files are often shipped gzipped)."""
  if not os.path.exists(path) and os.path.exists(path + ".gz"):
    return path + ".gz"
  return path


def aligned_files(files: dict[str, str], policy: TextPolicy, stats: LoadStats, pairs=None,
                  source: str | None = None) -> list[Component]:
  """Line-aligned files, one per language (2 = a pair, more = multi-way)."""
  if len(files) < 2:
    raise InputError(f"aligned files need at least 2 languages, got {list(files)}")
  langs = list(files)
  paths = [resolve_path(files[l]) for l in langs]
  for p in paths:
    if not os.path.exists(p):
      raise InputError(f"file not found: {p}")
  lazy = (all(not p.endswith(".gz") for p in paths)
          and sum(os.path.getsize(p) for p in paths) > LAZY_BYTES)
  columns = [IndexedLines(p, policy, stats) if lazy else read_lines(p, policy, stats)
             for p in paths]
  for p, c in zip(paths[1:], columns[1:]):
    if len(c) != len(columns[0]):
      raise InputError(f"aligned files differ in length: {paths[0]} has {len(columns[0])} "
                       f"lines, {p} has {len(c)}")
  source = source or os.path.commonprefix(paths).rstrip(".") or paths[0]
  if lazy:
    return [LazyColumnPair(source, lx, ly, columns[langs.index(lx)], columns[langs.index(ly)],
                           policy) for lx, ly in select_pairs(langs, pairs)]
  return multiway_components(source, langs, columns, policy, stats, pairs)


# Plain files above this total size are not loaded: a line-offset index gives random access,
# so a host reads only the lines of the rows it needs (gzip cannot seek: it is always loaded).
LAZY_BYTES = 256 << 20


class LazyColumnPair(Component):
  """Two indexed files: lines are read and cleaned on access (None = unusable, redrawn)."""
  in_memory = False

  def __init__(self, source, lang_x, lang_y, xs: IndexedLines, ys: IndexedLines, policy):
    self.source, self.lang_x, self.lang_y = source, lang_x, lang_y
    self.xs, self.ys, self.policy = xs, ys, policy
    self.stats = LoadStats()

  def __len__(self):
    return len(self.xs)

  def __getitem__(self, i):
    return self.policy.clean((self.xs[i], self.ys[i]), self.stats)


def expand_aligned(spec: str) -> dict[str, str]:
  """`dir/train.{en,de}` -> {"en": "dir/train.en", "de": "dir/train.de"}."""
  m = re.fullmatch(r"(.*)\{([^{}]+)\}(.*)", spec)
  if not m:
    raise ConfigError(f"aligned source {spec!r} must name its languages as PREFIX.{{en,de}}")
  pre, langs, post = m.group(1), [l.strip() for l in m.group(2).split(",")], m.group(3)
  return {l: f"{pre}{l}{post}" for l in langs if l}


def tatoeba_dir(directory: str, policy: TextPolicy, stats: LoadStats,
                langs: Sequence[str] | None = None) -> list[Component]:
  """The LASER/XTREME layout: DIR/tatoeba.xxx-eng.xxx + DIR/tatoeba.xxx-eng.eng."""
  if not os.path.isdir(directory):
    raise InputError(f"tatoeba directory not found: {directory}")
  found = sorted(os.path.basename(p)[len("tatoeba."):-len("-eng.eng")]
                 for p in glob.glob(os.path.join(directory, "tatoeba.*-eng.eng")))
  if langs:
    missing = [l for l in langs if l not in found]
    if missing:
      half = os.path.join(directory, f"tatoeba.{missing[0]}-eng.{missing[0]}")
      raise InputError(f"{directory}: no tatoeba files for {', '.join(missing)}" + (
          f" ({half} has no tatoeba.{missing[0]}-eng.eng beside it)"
          if os.path.exists(half) else ""))
    found = list(langs)
  else:  # a language whose .eng side is missing is dropped: never without a word
    halves = sorted(os.path.basename(p)[len("tatoeba."):].split("-eng.")[0]
                    for p in glob.glob(os.path.join(directory, "tatoeba.*-eng.*"))
                    if not p.endswith(".eng"))
    dropped = sorted(set(halves) - set(found))
    if dropped:
      log.warning("%s: %d language(s) without their tatoeba.xxx-eng.eng file skipped: %s",
                  directory, len(dropped), ", ".join(dropped))
  if not found:
    raise InputError(f"{directory}: no tatoeba.xxx-eng.{{xxx,eng}} files")
  out = []
  for l in found:
    prefix = os.path.join(directory, f"tatoeba.{l}-eng")
    out += aligned_files({l: f"{prefix}.{l}", "eng": f"{prefix}.eng"}, policy, stats,
                         source=f"tatoeba.{l}-eng")
  return out


_PAIR_HEADER = ["lang_x", "text_x", "lang_y", "text_y"]


def _per_line_pairs(source, records, policy, stats, pairs) -> list[Component]:
  """(lang_x, text_x, lang_y, text_y) records of mixed language pairs -> one component each."""
  groups: dict[tuple[str, str], tuple[list, list]] = {}
  for lx, tx, ly, ty in records:
    if pairs and frozenset((lx, ly)) not in {frozenset(p) for p in pairs}:
      continue
    cleaned = policy.clean((tx, ty), stats)
    if cleaned:
      g = groups.setdefault((lx, ly), ([], []))
      g[0].append(cleaned[0])
      g[1].append(cleaned[1])
  return [ColumnPair(source, lx, ly, xs, ys) for (lx, ly), (xs, ys) in groups.items()]


def tsv_file(path: str, policy: TextPolicy, stats: LoadStats, pairs=None) -> list[Component]:
  lines = read_lines(path, policy, stats)
  if not lines or lines[0] is None:
    raise InputError(f"{path}:1: a TSV source needs a header line (language codes, or "
                     f"{chr(9).join(_PAIR_HEADER)})")
  header = lines[0].split("\t")
  rows = []
  for lineno, line in enumerate(lines[1:], start=2):
    if line is None:
      rows.append(None)
      continue
    if not line.strip():
      rows.append(("",) * len(header))
      continue
    fields = line.split("\t")
    if len(fields) != len(header):
      raise InputError(f"{path}:{lineno}: expected {len(header)} tab-separated fields "
                       f"({', '.join(header)}), got {len(fields)}")
    rows.append(tuple(fields))
  if header == _PAIR_HEADER:
    bad = sum(r is None for r in rows)
    stats.invalid_utf8 += bad
    return _per_line_pairs(path, [r for r in rows if r is not None], policy, stats, pairs)
  if len(header) < 2:
    raise InputError(f"{path}:1: header must name at least 2 languages, got {header}")
  columns = list(zip(*[(r if r is not None else (None,) * len(header)) for r in rows])) or \
      [()] * len(header)
  return multiway_components(path, header, columns, policy, stats, pairs)


def jsonl_file(path: str, policy: TextPolicy, stats: LoadStats, pairs=None) -> list[Component]:
  records = []
  for lineno, line in enumerate(read_lines(path, policy, stats), start=1):
    if line is None:
      stats.invalid_utf8 += 1
      continue
    if not line.strip():
      stats.empty += 1
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
      raise InputError(f"{path}:{lineno}: expected an object of strings")
    if set(obj) == set(_PAIR_HEADER):
      records.append(tuple(obj[k] for k in _PAIR_HEADER))
    elif len(obj) >= 2:
      for lx, ly in itertools.combinations(obj, 2):   # multi-way object: every pair it holds
        records.append((lx, obj[lx], ly, obj[ly]))
    else:
      raise InputError(f"{path}:{lineno}: expected {', '.join(_PAIR_HEADER)} or >= 2 "
                       f"language keys, got {sorted(obj)}")
  return _per_line_pairs(path, records, policy, stats, pairs)


def monolingual_file(lang: str, path: str, policy: TextPolicy,
                     stats: LoadStats) -> list[Component]:
  lines = [c[0] for c in (policy.clean((t,), stats) for t in read_lines(path, policy, stats))
           if c]
  if len(lines) < 2:
    raise InputError(f"{path}: a monolingual source needs at least 2 usable lines")
  return [Monolingual(path, lang, lines)]


# ----------------------------------------------------------------------------- specs
@dataclasses.dataclass(frozen=True)
class SourceSpec:
  kind: str
  arg: str
  weight: float = 1.0


KINDS = ("embedded", "aligned", "tatoeba", "tsv", "jsonl", "tfds", "mono")


def _weight(part: str, text: str) -> float:
  """The `@W` of a source entry: a finite number > 0 (1e400 is inf, '.' or 'abc' no number)."""
  try:
    weight = float(text)
  except ValueError:
    raise ConfigError(f"data.source entry {part!r}: weight {text!r} is not a number") from None
  if not math.isfinite(weight) or not weight > 0:
    raise ConfigError(f"data.source entry {part!r}: weight {text!r} must be a finite number "
                      f"> 0") from None
  return weight


def parse_specs(text: str) -> list[SourceSpec]:
  """`kind:arg[@weight]; ...` -> specs (see the module docstring)."""
  specs = []
  for part in (p.strip() for p in text.split(";")):
    if not part:
      continue
    kind, sep, arg = part.partition(":")
    if (not sep and kind != "embedded") or kind not in KINDS:
      raise ConfigError(f"data.source entry {part!r} must be KIND:ARG with KIND one of "
                        f"{', '.join(KINDS)} (or data.source=embedded)")
    weight = 1.0
    head, at, text_weight = arg.rpartition("@")
    if at and not re.search(r"[/{}]", text_weight):  # else an @ inside a path
      arg, weight = head, _weight(part, text_weight)
    specs.append(SourceSpec(kind, arg.strip(), weight))
  if not specs:
    raise ConfigError("data.source is empty")
  return specs


def parse_pairs(text: str) -> list[tuple[str, str]] | None:
  """`en-de,en-fr` -> [("en","de"), ("en","fr")]; empty -> None (every pair)."""
  out = []
  for p in (p.strip() for p in (text or "").split(",")):
    if not p:
      continue
    a, sep, b = p.partition("-")
    if not sep or not a or not b:
      raise ConfigError(f"data.pairs entry {p!r} must look like en-de")
    out.append((a, b))
  return out or None


def embedded_components(languages: Sequence[str], policy: TextPolicy, stats: LoadStats,
                        pairs=None) -> list[Component]:
  from bepa_jax.data import corpus as corpus_lib
  try:
    corpus = corpus_lib.load_embedded().select(list(languages))
  except ValueError as e:
    raise ConfigError(f"data.languages: {e}") from None
  if len(corpus.languages) < 2:
    raise ConfigError(f"data.languages needs at least 2 languages, got {list(languages)}")
  columns = [[r[j] for r in corpus.rows] for j in range(len(corpus.languages))]
  return multiway_components("embedded", list(corpus.languages), columns, policy, stats, pairs)


def open_spec(spec: SourceSpec, policy: TextPolicy, stats: LoadStats, pairs=None,
              tfds_data_dir: str | None = None, languages: Sequence[str] = ()) -> list[Component]:
  if spec.kind == "embedded":
    langs = [l.strip() for l in spec.arg.split(",") if l.strip()] or list(languages)
    if not langs:
      from bepa_jax.data import corpus as corpus_lib
      langs = list(corpus_lib.load_embedded().languages)
    return embedded_components(langs, policy, stats, pairs)
  if spec.kind == "aligned":
    return aligned_files(expand_aligned(spec.arg), policy, stats, pairs)
  if spec.kind == "tatoeba":
    directory, _, langs = spec.arg.partition(":")
    comps = tatoeba_dir(directory, policy, stats,
                        [l.strip() for l in langs.split(",") if l.strip()] or None)
    if pairs:
      wanted = {frozenset(p) for p in pairs}
      comps = [c for c in comps if frozenset((c.lang_x, c.lang_y)) in wanted]
    return comps
  if spec.kind == "tsv":
    return tsv_file(spec.arg, policy, stats, pairs)
  if spec.kind == "jsonl":
    return jsonl_file(spec.arg, policy, stats, pairs)
  if spec.kind == "mono":
    lang, sep, path = spec.arg.partition("=")
    if not sep:
      raise ConfigError(f"data.source entry mono:{spec.arg!r} must be mono:LANG=PATH")
    return monolingual_file(lang, path, policy, stats)
  if spec.kind == "tfds":
    name, _, split = spec.arg.partition(":")
    return tfds_sources.tfds_components(name, split or "train", policy, pairs=pairs,
                                        data_dir=tfds_data_dir or None)
  raise ConfigError(f"unknown source kind {spec.kind!r}")


def open_sources(text: str, policy: TextPolicy | None = None, pairs=None,
                 tfds_data_dir: str | None = None, languages: Sequence[str] = ()):
  """A `data.source` string -> (components, per-component weights, load stats).
  `languages`: those of the embedded corpus when its spec lists none (data.languages)."""
  policy = policy or TextPolicy()
  stats = LoadStats()
  comps, weights = [], []
  for spec in parse_specs(text):
    got = open_spec(spec, policy, stats, pairs, tfds_data_dir, languages)
    if not got:
      raise InputError(f"data.source entry {spec.kind}:{spec.arg} yields no usable pairs"
                       + (" for data.pairs" if pairs else ""))
    comps += got
    weights += [spec.weight] * len(got)
  if pairs:  # a pair no source holds would be dropped without a word
    held = {frozenset((c.lang_x, c.lang_y)) for c in comps}
    missing = [f"{a}-{b}" for a, b in pairs if frozenset((a, b)) not in held]
    if missing:
      raise ConfigError(f"data.pairs: {', '.join(missing)} in none of the sources (they hold "
                        f"{', '.join(sorted('-'.join(sorted(p)) for p in held))})")
  return comps, weights, stats


def iter_pairs(components: Sequence[Component]) -> Iterator[tuple[str, str, str, str]]:
  """Every pair of every component as (lang_x, text_x, lang_y, text_y)."""
  for c in components:
    for i in range(len(c)):
      pair = c[i]
      if pair is not None:   # lazy sources return None for unusable records
        yield c.lang_x, pair[0], c.lang_y, pair[1]


def iter_texts(components: Sequence[Component], limit: int = 0) -> Iterator[str]:
  """Distinct sentences of both sides (for tokenizer training), at most `limit` if > 0."""
  seen, n = set(), 0
  for _, tx, _, ty in iter_pairs(components):
    for t in (tx, ty):
      h = hash(t)
      if h not in seen:
        seen.add(h)
        yield t
        n += 1
        if limit and n >= limit:
          return


def lengths(components: Sequence[Component]) -> np.ndarray:
  return np.array([len(c) for c in components], np.int64)
