"""Transfer tasks and where their records come from (TFDS data sources or local JSONL).

Every reader yields normalised records, read lazily by index:
  classification : {"texts": (a,) or (a, b), "label": int}
  span           : {"id", "question", "context", "answers": [str], "answer_starts": [int]}
Tasks (train on English, evaluate each language):
  xnli     multi_nli:train -> xnli:test, 15 languages (premise Translation, hypothesis by language)
  mlqa     squad/v1.1:train -> mlqa/<lang>:test, 7 languages (context and question in one language)
  glue/X   glue/X:train -> glue/X:validation (mnli: validation_matched + validation_mismatched)
TFDS datasets must be prepared as array_record beforehand (we never download). Instead of TFDS,
`jsonl` gives local files with the same fields (`premise`, `hypothesis`, `label`; or `context`,
`question`, `answers: {text: [...], answer_start: [...]}`, `id`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Sequence

from bepa_jax.errors import ConfigError, InputError

XNLI_LANGS = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi",
              "zh")
MLQA_LANGS = ("ar", "de", "en", "es", "hi", "vi", "zh")
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "mnli", "qnli", "rte", "wnli")  # stsb: regression
NLI_LABELS = 3  # entailment, neutral, contradiction: the same order in multi_nli, xnli, glue/mnli


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Records:
  """A lazy, indexable view: records[i] = fn(source[index[i]])."""

  def __init__(self, source, fn: Callable, index: Sequence[int] | None = None):
    self.source, self.fn, self.index = source, fn, index

  def __len__(self):
    return len(self.index) if self.index is not None else len(self.source)

  def __getitem__(self, i):
    return self.fn(self.source[int(self.index[i]) if self.index is not None else int(i)])


@dataclasses.dataclass
class Task:
  name: str
  kind: str                      # "classification" | "span"
  num_labels: int                # classes; 2 (start, end) for span
  train: Callable[[], Records]   # opened on demand: evaluating needs no training data
  evals: dict                    # language (or split) -> Callable[[], Records]


# ----------------------------------------------------------------------------- field mappers
def classification_fields(text_fields: Sequence[str]):
  def fn(r):
    return {"texts": tuple(_text(r[k]) for k in text_fields), "label": int(r["label"])}
  return fn


def span_record(r):
  answers = r["answers"]
  return {"id": _text(r.get("id", "")), "question": _text(r["question"]),
          "context": _text(r["context"]), "answers": [_text(t) for t in answers["text"]],
          "answer_starts": [int(s) for s in answers["answer_start"]]}


def xnli_record(lang: str):
  def fn(r):
    hyp = r["hypothesis"]
    langs = [_text(l) for l in hyp["language"]]
    return {"texts": (_text(r["premise"][lang]), _text(hyp["translation"][langs.index(lang)])),
            "label": int(r["label"])}
  return fn


# ----------------------------------------------------------------------------- sources
def _register_text_builders():
  """multi_nli, xnli and glue are legacy builders: they register when tfds.text is imported."""
  from bepa_jax.data.tfds_sources import _import_tfds
  _import_tfds()
  import tensorflow_datasets.text  # noqa: F401


def tfds_source(name: str, split: str, data_dir: str | None = None):
  from bepa_jax.data import tfds_sources
  _register_text_builders()
  return tfds_sources.open_data_source(name, split, data_dir)


def glue_layout(name: str) -> tuple[list[str], int]:
  """(text fields, number of classes) from the builder's code: needs no prepared data."""
  from bepa_jax.data.tfds_sources import _import_tfds
  _register_text_builders()
  try:
    feats = _import_tfds().builder(name).info.features
  except Exception as e:  # noqa: BLE001 -- tfds raises many kinds; the user needs one line
    raise InputError(f"TFDS dataset {name!r}: {str(e).splitlines()[0] if str(e) else e!r}") from None
  return [k for k in feats.keys() if k not in ("label", "idx")], feats["label"].num_classes


def read_jsonl(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise InputError(f"{path}: file not found")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
  return out


def jsonl_records(path: str, kind: str, text_fields: Sequence[str] | None = None) -> Records:
  """A JSONL file with the TFDS fields; classification text fields default to the keys
  of the first record other than label/idx/id, in file order."""
  rows = read_jsonl(path)
  if not rows:
    raise InputError(f"{path}: no records")
  need = ("context", "question", "answers") if kind == "span" else ("label",)
  for n, r in enumerate(rows, 1):
    missing = [k for k in need if k not in r]
    if missing:
      raise InputError(f"{path}: record {n} lacks field {missing[0]!r}")
  if kind == "span":
    return Records(rows, span_record)
  fields = list(text_fields or [k for k in rows[0] if k not in ("label", "idx", "id")])
  if not 1 <= len(fields) <= 2:
    raise InputError(f"{path}: need 1 or 2 text fields besides label, found {fields}")
  return Records(rows, classification_fields(fields))


# ----------------------------------------------------------------------------- tasks
def get_task(name: str, data_dir: str | None = None, langs: Sequence[str] | None = None,
             train_jsonl: str | None = None, eval_jsonl: dict | None = None,
             num_labels: int = 0) -> Task:
  """The task called `name`; JSONL files, where given, replace the TFDS train / eval data."""
  eval_jsonl = dict(eval_jsonl or {})
  if name == "xnli":
    kind, n = "classification", NLI_LABELS
    train = lambda: Records(tfds_source("multi_nli", "train", data_dir)[1],
                            classification_fields(("premise", "hypothesis")))
    test = functools.lru_cache(None)(lambda: tfds_source("xnli", "test", data_dir)[1])
    def xnli_eval(lang):  # 15 languages, one data source
      return lambda: Records(test(), xnli_record(lang))
    all_langs = XNLI_LANGS
    evals = {l: xnli_eval(l) for l in all_langs}
  elif name == "mlqa":
    kind, n = "span", 2
    train = lambda: Records(tfds_source("squad/v1.1", "train", data_dir)[1], span_record)
    all_langs = MLQA_LANGS
    evals = {l: (lambda l=l: Records(tfds_source(f"mlqa/{l}", "test", data_dir)[1], span_record))
             for l in all_langs}
  elif name.startswith("glue/"):
    sub = name.split("/", 1)[1]
    if sub not in GLUE_TASKS:
      raise ConfigError(f"--task {name}: unknown or unsupported GLUE task (one of "
                        f"{', '.join(GLUE_TASKS)}; stsb is regression)")
    kind = "classification"
    fields, n = glue_layout(name)
    def glue(split):
      return lambda: Records(tfds_source(name, split, data_dir)[1], classification_fields(fields))
    train = glue("train")
    all_langs = (("validation_matched", "validation_mismatched") if sub == "mnli"
                 else ("validation",))
    evals = {s: glue(s) for s in all_langs}
  else:
    raise ConfigError(f"--task {name!r}: unknown (xnli, mlqa or glue/<task>)")
  if train_jsonl:
    train = lambda: jsonl_records(train_jsonl, kind)
  if eval_jsonl:  # local files replace the TFDS evaluation sets entirely
    evals = {l: (lambda p=p: jsonl_records(p, kind)) for l, p in eval_jsonl.items()}
  elif langs:
    unknown = [l for l in langs if l not in all_langs]
    if unknown:
      raise ConfigError(f"--langs: {name} has no {unknown[0]!r} (has {', '.join(all_langs)})")
    evals = {l: evals[l] for l in langs}
  if num_labels:
    n = int(num_labels)
  if kind == "classification" and n < 2:
    raise ConfigError(f"--task {name}: number of labels unknown; pass --num-labels")
  return Task(name, kind, n, train, evals)
