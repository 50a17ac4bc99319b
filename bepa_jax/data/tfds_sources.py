"""Parallel pairs from TFDS datasets through `tfds.data_source` (array_record; no TensorFlow).

Records are read lazily by index, so a host reads only the records of its rows. The pair
layout is found from the features, which covers the datasets we train on:
  * a `Translation` feature (top level: `para_crawl/*`, `wmt*`; or a field: `xnli`'s 15-way
    parallel `premise`)                        -> one component per language pair;
  * `TranslationVariableLanguages` (`ted_multi_translate`) -> rows indexed once per pair
    (needs data.pairs: 60 languages would give 1,770 pairs);
  * `tatoeba/tatoeba_xx`: source_sentence (xx) + target_sentence (en).
Datasets must be prepared beforehand as array_record (`tfds build NAME --file_format=array_record`
on a machine with internet); we never download.
"""
from __future__ import annotations

import importlib
import os
import re

import numpy as np

from bepa_jax.data.records import Component, LoadStats, TextPolicy, select_pairs
from bepa_jax.errors import ConfigError, InputError, one_line

# Legacy builders register only once their module is imported.
_LEGACY_MODULES = {"xnli": "tensorflow_datasets.text.xnli"}


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ConfigError("data.source tfds:... needs tensorflow-datasets: "
                      "pip install 'bepa-jax[tfds]'") from None
  return tfds


def _decode(value, policy: TextPolicy, where: str):
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      if policy.invalid_utf8 == "error":
        raise InputError(f"{where}: invalid UTF-8; set data.invalid_utf8=skip to drop such "
                         f"records") from None
      return None
  return str(value)


class TfdsPair(Component):
  """One language pair of a TFDS data source; records are read (and cleaned) on access."""
  in_memory = False

  def __init__(self, source, ds, lang_x, lang_y, extract, policy, index=None):
    self.source, self.lang_x, self.lang_y = source, lang_x, lang_y
    self.ds, self.extract, self.policy, self.index = ds, extract, policy, index
    self.stats = LoadStats()

  def __len__(self):
    return len(self.index) if self.index is not None else len(self.ds)

  def __getitem__(self, i):
    key = int(self.index[i]) if self.index is not None else int(i)
    rec = self.ds[key]
    where = f"tfds {self.source} record {key}"
    texts = [_decode(v, self.policy, where) for v in self.extract(rec)]
    return self.policy.clean(texts, self.stats)   # None: unusable, the pipeline replaces it


def _builder(name: str, data_dir: str | None):
  tfds = _import_tfds()
  base = name.split("/")[0].split(":")[0]
  if base in _LEGACY_MODULES:
    importlib.import_module(_LEGACY_MODULES[base])
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise InputError(f"unknown TFDS dataset {name!r} (data.source tfds:{name})") from None
  except (ValueError, KeyError) as e:
    raise InputError(f"TFDS dataset {name!r}: {one_line(e)}") from None


def open_data_source(name: str, split: str, data_dir: str | None = None):
  """`tfds.data_source` with one-line errors for unknown names, splits and unprepared data."""
  tfds = _import_tfds()
  builder = _builder(name, data_dir)
  prepared = builder.is_prepared()
  if prepared:
    known = list(builder.info.splits.keys())
    if re.split(r"[\[+]", split)[0] not in known:
      raise InputError(f"TFDS dataset {name!r} has no split {split!r} (has {', '.join(known)})")
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001 -- tfds raises many kinds; the user needs one line
    if not prepared:
      raise InputError(f"TFDS dataset {name!r} is not prepared as array_record in "
                       f"{builder.data_dir_root}: run `tfds build {name} "
                       f"--file_format=array_record` where it can download") from None
    raise InputError(f"TFDS dataset {name!r} split {split!r}: {one_line(e)}") from None
  return builder, ds


def dataset_files(name: str, data_dir: str | None = None) -> list[list]:
  """[[file, size]] under a prepared dataset's directory (what keys its record store)."""
  root = str(_builder(name, data_dir).data_dir)
  out = []
  for d, _, files in sorted(os.walk(root)):
    for f in sorted(files):
      path = os.path.join(d, f)
      out.append([os.path.relpath(path, root), os.path.getsize(path)])
  return out


def _layout(name: str, features):
  """-> (kind, field, languages) describing where the pair texts are."""
  f = _import_tfds().features
  if isinstance(features, f.Translation):
    return "translation", None, list(features.languages)
  items = dict(features.items()) if isinstance(features, f.FeaturesDict) else {}
  for key, feat in items.items():
    if isinstance(feat, f.Translation):
      return "translation", key, list(feat.languages)
  if "source_sentence" in items and "target_sentence" in items:
    lang = name.split("/")[-1].split(":")[0]
    lang = lang[len("tatoeba_"):] if lang.startswith("tatoeba_") else "src"
    return "source_target", None, [lang, "en"]
  for key, feat in items.items():
    if isinstance(feat, f.TranslationVariableLanguages):
      return "variable", key, None
  raise InputError(f"TFDS dataset {name!r} has no translation features "
                   f"({', '.join(items) or type(features).__name__}): cannot read pairs")


def tfds_components(name: str, split: str, policy: TextPolicy, pairs=None,
                    data_dir: str | None = None) -> list[Component]:
  builder, ds = open_data_source(name, split, data_dir)
  kind, field, languages = _layout(name, builder.info.features)
  src = f"tfds:{name}:{split}"
  if kind == "translation":
    def make(lx, ly):
      if field is None:
        return lambda r: (r[lx], r[ly])
      return lambda r: (r[field][lx], r[field][ly])
    return [TfdsPair(src, ds, lx, ly, make(lx, ly), policy)
            for lx, ly in select_pairs(languages, pairs)]
  if kind == "source_target":
    if pairs and frozenset(languages) not in {frozenset(p) for p in pairs}:
      return []
    return [TfdsPair(src, ds, languages[0], languages[1],
                     lambda r: (r["source_sentence"], r["target_sentence"]), policy)]
  # variable languages: one pass over the records to index which rows hold each pair
  if not pairs:
    raise ConfigError(f"TFDS dataset {name!r} has a variable set of languages per record: "
                      f"set data.pairs (e.g. en-de,en-fr)")
  rows = {p: [] for p in pairs}
  for i in range(len(ds)):
    langs = [_decode(l, policy, f"tfds {src} record {i}") for l in ds[i][field]["language"]]
    for p in pairs:
      if p[0] in langs and p[1] in langs:
        rows[p].append((i, langs.index(p[0]), langs.index(p[1])))
  out = []
  for (lx, ly), idx in rows.items():
    if not idx:
      continue
    out.append(_VariablePair(src, ds, lx, ly, field, policy, np.array(idx, np.int64)))
  return out


class _VariablePair(TfdsPair):
  """A pair inside TranslationVariableLanguages records (positions found by the index pass)."""

  def __init__(self, source, ds, lang_x, lang_y, field, policy, idx):
    super().__init__(source, ds, lang_x, lang_y, None, policy, index=idx[:, 0])
    self.field, self.pos = field, idx[:, 1:]

  def __getitem__(self, i):
    rec = self.ds[int(self.index[i])]
    tr = rec[self.field]["translation"]
    a, b = self.pos[i]
    where = f"tfds {self.source} record {int(self.index[i])}"
    texts = [_decode(tr[a], self.policy, where), _decode(tr[b], self.policy, where)]
    return self.policy.clean(texts, self.stats)
