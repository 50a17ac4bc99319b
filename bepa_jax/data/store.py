"""The record store: a corpus read and tokenised once, memory-mapped by later runs and hosts.

With `data.cache_dir` set, the sources of `data.source` are parsed once into a directory keyed
by the content of the corpus, and tokenised once into a subdirectory keyed by the tokenizer:

  DIR/corpus-<key>/          key: sha256 of the source files' bytes, data.source, data.pairs,
                             data.languages and the text policy (data.max_chars, ...)
    meta.json                the key's material, the components (source, languages, size),
                             their weights, what reading dropped (LoadStats)
    text_bytes.bin           every distinct (cleaned) text, UTF-8, back to back
    text_offsets.bin         [T + 1] int64
    pairs.bin                [N, 2] int32: the text ids of each record's sides (-1: unusable)
    meanings.bin             [N] int64: its meaning in a multi-way source (-1: none), if any
    tokens-<fingerprint>/    the tokenizer's content hash (data/tokenizer.py fingerprint)
      meta.json, tokens.bin (every text's ids back to back, uint16 when the vocabulary
      fits), token_offsets.bin [T + 1] int64, token_counts.bin [T] int32

A host then opens the corpus without parsing it (hashing its files is what start-up costs),
reads only the texts or tokens of its own rows, and the plan (data/plan.py) works on the
pairs' text ids (exact: equal texts have one id) and token counts. A store is written to a
temporary directory and renamed into place once complete, so no reader sees half of one; a
changed corpus or tokenizer has another key, so it gets its own store, never the old one; a
directory whose meta.json does not match its name is refused.

Why plain memory-mapped arrays and not array_record: the access is random, a few thousand
small records per step, and the plan needs whole integer columns; a flat token array with
offsets gives both as zero-copy numpy views, with no chunk to decompress per record and no
dependency beyond numpy.
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from typing import Callable, Sequence

import numpy as np

from bepa_jax.data import corpus as corpus_lib
from bepa_jax.data import sources, tfds_sources
from bepa_jax.data.records import Component, LoadStats, TextPolicy
from bepa_jax.data.table import Table, meaning_ids
from bepa_jax.errors import InputError

log = logging.getLogger("bepa")

VERSION = 1
CHUNK = 65536


def file_digest(path: str) -> str:
  """sha256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(16 << 20), b""):
      h.update(block)
  return h.hexdigest()


def spec_files(spec: sources.SourceSpec) -> list[str]:
  """The files a source entry reads: their bytes key its record store."""
  if spec.kind == "embedded":
    return [corpus_lib.RESOURCE]
  if spec.kind == "aligned":
    return [sources.resolve_path(p) for p in sources.expand_aligned(spec.arg).values()]
  if spec.kind == "tatoeba":
    directory = spec.arg.partition(":")[0]
    return sorted(glob.glob(os.path.join(directory, "tatoeba.*-eng.*")))
  if spec.kind == "mono":
    return [spec.arg.partition("=")[2]]
  if spec.kind == "tfds":
    return []   # a TFDS dataset is keyed by its own files' names and sizes (`material`)
  return [spec.arg]


def material(text: str, policy: TextPolicy, pairs=None, tfds_data_dir: str | None = None,
             languages: Sequence[str] = ()) -> dict:
  """What the records of a `data.source` depend on, with the sha256 of every file it reads
  (TFDS datasets, versioned and never rewritten in place: their files' names and sizes). A
  missing file has no digest: no store has this key, and reading the sources names it."""
  files = []
  for spec in sources.parse_specs(text):
    files += [[p, file_digest(p) if os.path.isfile(p) else None] for p in spec_files(spec)]
    if spec.kind == "tfds":
      name, _, _ = spec.arg.partition(":")
      files += tfds_sources.dataset_files(name, tfds_data_dir or None)
  return {"source": text, "pairs": [list(p) for p in pairs or []], "languages": list(languages),
          "policy": [policy.max_chars, policy.long_lines, policy.invalid_utf8],
          "tfds_data_dir": tfds_data_dir or "", "files": files}


def corpus_key(material: dict) -> str:
  return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def _array(path: str, dtype, shape) -> np.ndarray:
  """A read-only memory map (an empty array for an empty file)."""
  if not int(np.prod(shape)):
    return np.zeros(shape, dtype)
  want = int(np.prod(shape)) * np.dtype(dtype).itemsize
  if not os.path.isfile(path) or os.path.getsize(path) != want:
    raise InputError(f"data.cache_dir: {path} is missing or damaged (expected {want} bytes): "
                     f"delete {os.path.dirname(path)} to rebuild")
  # a plain ndarray view of the map: slicing a np.memmap costs microseconds per slice
  return np.memmap(path, dtype=dtype, mode="r", shape=tuple(shape)).view(np.ndarray)


def _publish(tmp: str, final: str) -> None:
  """Renames a complete store into place; another process that got there first wins."""
  try:
    os.rename(tmp, final)
  except OSError:
    if not os.path.isdir(final):
      raise
    shutil.rmtree(tmp, ignore_errors=True)


def _read_meta(path: str, key: str, what: str) -> dict | None:
  """The store's meta.json, None when there is no store; refused when it is not this one."""
  meta_path = os.path.join(path, "meta.json")
  if not os.path.isdir(path):
    return None
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"data.cache_dir: {path} is not a complete {what} ({e}): delete it to "
                     f"rebuild") from None
  if meta.get("key") != key or meta.get("version") != VERSION:
    raise InputError(f"data.cache_dir: {path} holds a {what} for key {meta.get('key')} "
                     f"(version {meta.get('version')}), not {key} (version {VERSION}): "
                     f"delete it to rebuild")
  return meta


class StoredPair(Component):
  """One component of a stored corpus: texts read from the memory-mapped store on access."""
  in_memory = False

  def __init__(self, store: "CorpusStore", spec: dict, base: int):
    self.store, self.base, self.n = store, base, int(spec["n"])
    self.source, self.lang_x, self.lang_y = spec["source"], spec["lang_x"], spec["lang_y"]
    self.monolingual = bool(spec["monolingual"])

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    x, y = (int(t) for t in self.store.pairs[self.base + int(i)])
    return None if x < 0 else (self.store.text(x), self.store.text(y))

  def group(self, i):
    m = self.store.meanings
    return None if m is None or m[self.base + int(i)] < 0 else int(m[self.base + int(i)])


class CorpusStore:
  """An opened corpus store (module docstring): components, texts and pairs, memory-mapped."""

  def __init__(self, path: str, meta: dict):
    self.path, self.meta = path, meta
    T, N = int(meta["texts"]), int(meta["pairs"])
    self.text_offsets = _array(self._file("text_offsets.bin"), np.int64, (T + 1,))
    self.text_bytes = _array(self._file("text_bytes.bin"), np.uint8,
                             (int(self.text_offsets[-1]) if T else 0,))
    self.pairs = _array(self._file("pairs.bin"), np.int32, (N, 2))
    self.meanings = (_array(self._file("meanings.bin"), np.int64, (N,))
                     if meta["has_meanings"] else None)
    bases = np.cumsum([0] + [int(c["n"]) for c in meta["components"]])
    self.components = [StoredPair(self, c, int(b)) for c, b in zip(meta["components"], bases)]
    self.weights = [float(w) for w in meta["weights"]]
    self.stats = LoadStats(**meta["stats"])

  def __reduce__(self):   # a worker process reopens the maps instead of copying them
    return CorpusStore, (self.path, self.meta)

  def _file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def text(self, i: int) -> str:
    a, b = int(self.text_offsets[i]), int(self.text_offsets[i + 1])
    return bytes(self.text_bytes[a:b]).decode("utf-8")

  def table(self, tokens: "TokenStore | None" = None) -> Table:
    """The plan's integers (data/table.py): text ids as keys, token counts by text id."""
    offsets = np.concatenate([[0], np.cumsum([c.n for c in self.components])])
    table = _StoreTable(offsets, self.pairs, self.meanings,
                        text_lengths=None if tokens is None else tokens.counts)
    table.rebuild = (self.table, (tokens,))
    return table

  def tokens(self, tokenizer, build: bool = True) -> "TokenStore | None":
    """The token store of `tokenizer` (built when missing and `build`)."""
    fingerprint = tokenizer.fingerprint()
    path = os.path.join(self.path, f"tokens-{fingerprint}")
    meta = _read_meta(path, fingerprint, "token store")
    if meta is None and build:
      _write_tokens(self, tokenizer, path, fingerprint)
      meta = _read_meta(path, fingerprint, "token store")
    return None if meta is None else TokenStore(path, meta)


class _StoreTable(Table):
  """A table of memory-mapped arrays: pickled as the way to reopen them."""
  rebuild: tuple

  def __reduce__(self):
    return self.rebuild


class TokenStore:
  """Every text's token ids (memory-mapped): a host takes its rows' ids, tokenising none."""

  def __init__(self, path: str, meta: dict):
    self.path, self.meta = path, meta
    T = int(meta["texts"])
    self.offsets = _array(os.path.join(path, "token_offsets.bin"), np.int64, (T + 1,))
    self.counts = _array(os.path.join(path, "token_counts.bin"), np.int32, (T,))
    self.ids_flat = _array(os.path.join(path, "tokens.bin"), np.dtype(meta["dtype"]),
                           (int(self.offsets[-1]) if T else 0,))

  def __reduce__(self):
    return TokenStore, (self.path, self.meta)

  def ids(self, text_ids: np.ndarray) -> list[np.ndarray]:
    text_ids = np.asarray(text_ids, np.int64)
    starts, ends = self.offsets[text_ids].tolist(), self.offsets[text_ids + 1].tolist()
    return [self.ids_flat[a:b] for a, b in zip(starts, ends)]


def open_corpus(cache_dir: str, material: dict, read: Callable[[], tuple],
                build: bool = True) -> CorpusStore | None:
  """The corpus store for `material` in `cache_dir`: opened, or (when missing and `build`)
  written from `read()` = (components, weights, load stats), the sources parsed as usual."""
  key = corpus_key(material)
  path = os.path.join(cache_dir, f"corpus-{key}")
  meta = _read_meta(path, key, "corpus store")
  if meta is None:
    if not build:
      return None
    t0 = time.perf_counter()
    components, weights, stats = read()
    _write_corpus(path, key, material, components, weights, stats)
    meta = _read_meta(path, key, "corpus store")
    log.info("data: wrote the corpus store %s (%d pairs, %d texts) in %.1fs", path,
             meta["pairs"], meta["texts"], time.perf_counter() - t0)
  else:
    log.info("data: reading the corpus store %s (%d pairs, %d texts)", path, meta["pairs"],
             meta["texts"])
  return CorpusStore(path, meta)


def _write_corpus(path: str, key: str, material: dict, components: Sequence[Component],
                  weights, stats: LoadStats) -> None:
  """Reads every record once; writes texts (each distinct text once), pairs and meanings."""
  parent = os.path.dirname(path) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in components])]).astype(np.int64)
    pairs = np.full((int(offsets[-1]), 2), -1, np.int32)
    ids: dict[str, int] = {}
    ends = [0]
    with open(os.path.join(tmp, "text_bytes.bin"), "wb") as blob:
      for c, comp in enumerate(components):
        for i in range(len(comp)):
          pair = comp[i]
          if pair is None:
            continue
          for s in (0, 1):
            t = ids.get(pair[s])
            if t is None:
              t = ids[pair[s]] = len(ids)
              raw = pair[s].encode("utf-8")
              blob.write(raw)
              ends.append(ends[-1] + len(raw))
            pairs[offsets[c] + i, s] = t
    del ids
    np.asarray(ends, np.int64).tofile(os.path.join(tmp, "text_offsets.bin"))
    pairs.tofile(os.path.join(tmp, "pairs.bin"))
    meanings = meaning_ids(components, offsets)
    if meanings is not None:
      meanings.tofile(os.path.join(tmp, "meanings.bin"))
    total = LoadStats()
    total.add(stats)
    for comp in components:
      if comp.stats is not None:   # a lazy reader's drops: all of them, now that all was read
        total.add(comp.stats)
    meta = {"version": VERSION, "key": key, "material": material, "texts": len(ends) - 1,
            "pairs": int(offsets[-1]), "has_meanings": meanings is not None,
            "weights": [float(w) for w in weights], "stats": total.__dict__,
            "components": [{"source": c.source, "lang_x": c.lang_x, "lang_y": c.lang_y,
                            "monolingual": bool(c.monolingual), "n": len(c)}
                           for c in components]}
    with open(os.path.join(tmp, "meta.json"), "w") as f:   # last: marks the store complete
      json.dump(meta, f)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _publish(tmp, path)


def _write_tokens(corpus: CorpusStore, tokenizer, path: str, fingerprint: str) -> None:
  """Tokenises every distinct text once, in chunks."""
  t0 = time.perf_counter()
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
  T = len(corpus.text_offsets) - 1
  counts = np.zeros(T, np.int32)
  try:
    with open(os.path.join(tmp, "tokens.bin"), "wb") as out:
      for a in range(0, T, CHUNK):
        b = min(T, a + CHUNK)
        ids = tokenizer.encode_batch([corpus.text(i) for i in range(a, b)])
        counts[a:b] = [len(t) for t in ids]
        np.fromiter(itertools.chain.from_iterable(ids), dtype,
                    int(counts[a:b].sum())).tofile(out)
    counts.tofile(os.path.join(tmp, "token_counts.bin"))
    np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).tofile(
        os.path.join(tmp, "token_offsets.bin"))
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump({"version": VERSION, "key": fingerprint, "texts": T,
                 "dtype": np.dtype(dtype).name, "vocab_size": int(tokenizer.vocab_size)}, f)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _publish(tmp, path)
  log.info("data: tokenised %d texts into %s in %.1fs", T, path, time.perf_counter() - t0)
