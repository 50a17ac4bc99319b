"""Transfer tasks and where their records come from (TFDS data sources, MLQA's release, JSONL).

Every reader yields normalised records, read lazily by index:
  classification : {"texts": (a,) or (a, b), "label": int}   (regression: "label" a float)
  span           : {"id", "question", "context", "answers": [str], "answer_starts": [int]}
Tasks (train on English, evaluate each language):
  xnli        multi_nli:train -> xnli:test, 15 languages (premise Translation, hypothesis by
              language); accuracy
  mlqa        squad/v1.1:train -> mlqa/<lang>:test, 7 languages (context and question in one
              language); EM / F1 by MLQA's official scoring in the context language
  mlqa-gxlt   squad/v1.1:train -> MLQA's generalised cross-lingual transfer: every (context
              language, question language) pair, read from MLQA's release files (TFDS's `mlqa`
              builder has the 7 same-language configs only)
  glue/X      glue/X:train -> glue/X:validation (mnli: validation_matched + _mismatched), each
              task's official metric; stsb a regression (one output, MSE)
TFDS datasets must be prepared as array_record beforehand (we never download). Instead of TFDS,
`jsonl` gives local files with the same fields (`premise`, `hypothesis`, `label`: a class
number or the task's class name, e.g. entailment / neutral / contradiction as in HF's xnli; or
`context`, `question`, `answers: {text: [...], answer_start: [...]}`, `id`: a training record
whose answer lies outside its context is skipped, counted in one warning line). MLQA's release
(`--mlqa-data`): a directory with `<split>-context-<c>-question-<q>.json` files (in it or in
its `<split>/` folder), SQuAD v1 JSON {"data": [{"paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}]}]}]}]}, or a JSONL file of records {"id",
"context", "question", "answers", "context_lang", "question_lang"}, answers either as
[{"text", "answer_start"}, ...] or as {"text": [...], "answer_start": [...]}.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Callable, Sequence

from bepa_jax.errors import ConfigError, InputError, one_line

XNLI_LANGS = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi",
              "zh")
MLQA_LANGS = ("ar", "de", "en", "es", "hi", "vi", "zh")
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
GLUE_METRICS = {"cola": "mcc", "mrpc": "f1_accuracy", "qqp": "f1_accuracy",
                "stsb": "pearson_spearman"}  # the others: accuracy
NLI_NAMES = ("entailment", "neutral", "contradiction")  # one order in multi_nli, xnli, glue/mnli
NLI_LABELS = len(NLI_NAMES)
log = logging.getLogger("bepa.transfer")


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
  kind: str                      # "classification" | "regression" | "span"
  num_labels: int                # classes; 1 for regression; 2 (start, end) for span
  train: Callable[[], Records]   # opened on demand: evaluating needs no training data
  evals: dict                    # language / split / "c-q" pair -> Callable[[], Records]
  metric_set: str = "accuracy"   # a key of metrics.METRIC_SETS
  score_langs: dict = dataclasses.field(default_factory=dict)  # span: eval -> scoring language
  pairs: dict = dataclasses.field(default_factory=dict)   # mlqa-gxlt: eval -> (context, question)
  label_names: tuple = ()        # classification: class names a JSONL label may use


# ----------------------------------------------------------------------------- field mappers
def classification_fields(text_fields: Sequence[str], label_type: type = int):
  def fn(r):
    return {"texts": tuple(_text(r[k]) for k in text_fields), "label": label_type(r["label"])}
  return fn


def span_record(r):
  answers = r["answers"]
  if isinstance(answers, list):  # SQuAD JSON layout: [{"text", "answer_start"}, ...]
    answers = {"text": [a["text"] for a in answers],
               "answer_start": [a["answer_start"] for a in answers]}
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


def glue_layout(name: str) -> tuple[list[str], int, tuple[str, ...]]:
  """(text fields, number of classes, class names) from the builder's code: needs no
  prepared data."""
  from bepa_jax.data.tfds_sources import _import_tfds
  _register_text_builders()
  try:
    feats = _import_tfds().builder(name).info.features
  except Exception as e:  # noqa: BLE001 -- tfds raises many kinds; the user needs one line
    raise InputError(f"TFDS dataset {name!r}: {one_line(e)}") from None
  label = feats["label"]
  return ([k for k in feats.keys() if k not in ("label", "idx")], label.num_classes,
          tuple(n.lower() for n in getattr(label, "names", None) or ()))


def read_jsonl(path: str, line_numbers: bool = False) -> list:
  """The records of a JSONL file (blank lines skipped); with `line_numbers`, (line, record)."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: file not found")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        out.append((n, json.loads(line)) if line_numbers else json.loads(line))
      except json.JSONDecodeError as e:
        raise InputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
  return out


def _label(where: str, value, label_type: type, names: Sequence[str]):
  """A JSONL label as `label_type`: a number, or one of the task's class names -> its index."""
  text = str(value).strip()
  if isinstance(value, (bool, dict, list)):
    pass
  elif label_type is not int:  # a regression target
    try:
      return label_type(text)
    except ValueError:
      pass
  elif text.lower() in names:
    return names.index(text.lower())
  elif re.fullmatch(r"-?\d+", text) or (isinstance(value, float) and value.is_integer()):
    return int(value)
  raise InputError(f"{where}: label {value!r} is not " + (
      "a number" if label_type is not int else "a class number" + (
          f" or one of {', '.join(names)}" if names else "")))


def jsonl_records(path: str, kind: str, text_fields: Sequence[str] | None = None,
                  label_type: type = int, label_names: Sequence[str] = ()) -> Records:
  """A JSONL file with the TFDS fields; classification text fields default to the keys
  of the first record other than label/idx/id, in file order; labels are checked (and class
  names made numbers) here, naming the line of a bad one."""
  numbered = read_jsonl(path, line_numbers=True)
  rows = [r for _, r in numbered]
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
  for line, r in numbered:
    r["label"] = _label(f"{path}:{line}", r["label"], label_type, tuple(label_names))
  return Records(rows, classification_fields(fields, label_type))


def usable_answers(path: str, records: Records) -> Records:
  """Span training records whose (first) answer lies within its context: features trains on
  that one, and an answer_start past the context would teach "no answer". The others are
  skipped with one warning line counting them; none usable is an InputError."""
  def usable(r):
    text = r["answers"][0] if r["answers"] else ""
    start = r["answer_starts"][0] if r["answer_starts"] else -1
    return bool(text.strip()) and 0 <= start and start + len(text) <= len(r["context"])
  keep = []
  for i in range(len(records)):
    try:
      if usable(records[i]):
        keep.append(i)
    except (KeyError, TypeError, ValueError) as e:
      raise InputError(f"{path}: record {i + 1}: 'answers' needs text and an integer "
                       f"answer_start ({one_line(e)})") from None
  if not keep:
    raise InputError(f"{path}: none of the {len(records)} training answers lies within its "
                     f"context (answer_start past the context): nothing to train on")
  if len(keep) < len(records):
    log.warning("%s: %d of %d training answers lie outside their context (answer_start past "
                "it): those records are skipped", path, len(records) - len(keep), len(records))
  return Records(records.source, records.fn, keep)


# ----------------------------------------------------------------------------- MLQA release
MLQA_FILE = re.compile(r"^(dev|test)-context-([a-z]+)-question-([a-z]+)\.json$")
_LANG_FIELDS = ("context_lang", "question_lang")


def _check_answers(where: str, answers):
  """SQuAD JSON answers: a non-empty list of {"text", "answer_start"}."""
  if not isinstance(answers, list) or not answers:
    raise InputError(f"{where}: 'answers' must be a non-empty list of {{text, answer_start}}")
  for j, a in enumerate(answers):
    if not (isinstance(a, dict) and isinstance(a.get("text"), str)
            and isinstance(a.get("answer_start"), int)):
      raise InputError(f"{where}: answers[{j}] needs 'text' (string) and 'answer_start' (int)")


def read_squad_json(path: str) -> list[dict]:
  """One SQuAD v1 JSON file (MLQA's release format) -> span records, in file order."""
  try:
    with open(path, encoding="utf-8") as f:
      doc = json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
  if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
    raise InputError(f"{path}: not SQuAD JSON (no 'data' list at the top)")
  out = []
  for a, article in enumerate(doc["data"]):
    paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
    if not isinstance(paragraphs, list):
      raise InputError(f"{path}: data[{a}] lacks a 'paragraphs' list")
    for p, para in enumerate(paragraphs):
      where = f"{path}: data[{a}].paragraphs[{p}]"
      if not isinstance(para, dict) or not isinstance(para.get("context"), str):
        raise InputError(f"{where} lacks 'context'")
      if not isinstance(para.get("qas"), list):
        raise InputError(f"{where} lacks a 'qas' list")
      for q, qa in enumerate(para["qas"]):
        w = f"{where}.qas[{q}]"
        missing = [k for k in ("id", "question", "answers") if k not in qa]
        if missing:
          raise InputError(f"{w} lacks {missing[0]!r}")
        _check_answers(w, qa["answers"])
        out.append(span_record({"id": qa["id"], "question": qa["question"],
                                "context": para["context"], "answers": qa["answers"]}))
  if not out:
    raise InputError(f"{path}: no questions")
  return out


def _mlqa_jsonl(path: str) -> dict:
  """A JSONL of MLQA records -> {(context_lang, question_lang): [span records]}."""
  groups = {}
  for n, r in enumerate(read_jsonl(path), 1):
    missing = [k for k in ("id", "context", "question", "answers") + _LANG_FIELDS
               if k not in r]
    if missing:
      raise InputError(f"{path}:{n}: record lacks field {missing[0]!r}")
    if isinstance(r["answers"], list):
      _check_answers(f"{path}:{n}", r["answers"])
    elif not (isinstance(r["answers"], dict) and r["answers"].get("text")
              and len(r["answers"]["text"]) == len(r["answers"].get("answer_start", ()))):
      raise InputError(f"{path}:{n}: 'answers' must be [{{text, answer_start}}, ...] or "
                       f"{{text: [...], answer_start: [...]}} of one length")
    groups.setdefault((str(r["context_lang"]), str(r["question_lang"])), []).append(
        span_record(r))
  if not groups:
    raise InputError(f"{path}: no records")
  return groups


def mlqa_pairs(path: str, split: str = "test") -> dict:
  """MLQA's data at `path` -> {(context lang, question lang): () -> records}, sorted.

  path: a directory holding `<split>-context-<c>-question-<q>.json` (itself or in `<split>/`,
  as in the release's MLQA_V1/), or a .jsonl file (fields in the module docstring)."""
  if os.path.isfile(path) and path.endswith(".jsonl"):
    groups = _mlqa_jsonl(path)
    return {k: (lambda v=v: v) for k, v in sorted(groups.items())}
  if not os.path.isdir(path):
    raise InputError(f"--mlqa-data {path}: not found (a directory of MLQA's release files, "
                     f"or a .jsonl file)")
  found = {}
  for folder in (path, os.path.join(path, split)):
    if not os.path.isdir(folder):
      continue
    for name in sorted(os.listdir(folder)):
      m = MLQA_FILE.match(name)
      if m and m.group(1) == split:
        found.setdefault((m.group(2), m.group(3)), os.path.join(folder, name))
    if found:
      break
  if not found:
    raise InputError(f"--mlqa-data {path}: no {split}-context-<c>-question-<q>.json files "
                     f"(in it or in {split}/)")
  cache = {}
  def reader(key):
    def read():
      if key not in cache:
        cache[key] = read_squad_json(found[key])
      return cache[key]
    return read
  return {k: reader(k) for k in sorted(found)}


def _span_score_lang(key: str, where: str):
  """The scoring language of a span evaluation set: an MLQA language, or 'squad' -> None
  (SQuAD v1.1's English normalisation)."""
  from bepa_jax.finetune.metrics import MLQA_SCORING_LANGS
  if key == "squad":
    return None
  if key not in MLQA_SCORING_LANGS:
    raise ConfigError(f"{where}: span answers are scored in their language, one of "
                      f"{', '.join(MLQA_SCORING_LANGS)}, or 'squad' (SQuAD v1.1); got {key!r}")
  return key


# ----------------------------------------------------------------------------- tasks
def _xnli(data_dir):
  """multi_nli:train -> xnli:test -> (task, its languages, label type)."""
  train = lambda: Records(tfds_source("multi_nli", "train", data_dir)[1],
                          classification_fields(("premise", "hypothesis")))
  test = functools.lru_cache(None)(lambda: tfds_source("xnli", "test", data_dir)[1])
  def xnli_eval(lang):  # 15 languages, one data source
    return lambda: Records(test(), xnli_record(lang))
  evals = {l: xnli_eval(l) for l in XNLI_LANGS}
  return (Task("xnli", "classification", NLI_LABELS, train, evals, label_names=NLI_NAMES),
          XNLI_LANGS, int)


def _mlqa(name, data_dir, mlqa_data, mlqa_split, eval_jsonl):
  """squad/v1.1:train -> MLQA (TFDS, or the release files of `mlqa_data`)."""
  train = lambda: Records(tfds_source("squad/v1.1", "train", data_dir)[1], span_record)
  if name == "mlqa-gxlt" and not mlqa_data:
    raise ConfigError("--task mlqa-gxlt reads MLQA's release files: pass --mlqa-data DIR "
                      "(TFDS's mlqa builder has the same-language pairs only)")
  if name == "mlqa-gxlt" and eval_jsonl:
    raise ConfigError("--task mlqa-gxlt takes its data from --mlqa-data (a directory or a "
                      ".jsonl with context_lang / question_lang), not --eval-jsonl")
  pairs = {}
  if mlqa_data:
    found = mlqa_pairs(mlqa_data, mlqa_split)
    if name == "mlqa":
      found = {k: v for k, v in found.items() if k[0] == k[1]}
      if not found:
        raise InputError(f"--mlqa-data {mlqa_data}: no same-language pair "
                         f"(context-<l>-question-<l>)")
    all_langs = tuple(dict.fromkeys(l for pair in found for l in pair))
    keys = {pair: (pair[0] if name == "mlqa" else f"{pair[0]}-{pair[1]}") for pair in found}
    evals = {keys[p]: fn for p, fn in found.items()}
    pairs = {keys[p]: p for p in found} if name == "mlqa-gxlt" else {}
  else:
    all_langs = MLQA_LANGS
    evals = {l: (lambda l=l: Records(tfds_source(f"mlqa/{l}", "test", data_dir)[1],
                                     span_record)) for l in all_langs}
  return Task(name, "span", 2, train, evals, "span", pairs=pairs), all_langs, int


def _glue(name, data_dir):
  """glue/X:train -> glue/X:validation (mnli: both validation splits)."""
  sub = name.split("/", 1)[1]
  if sub not in GLUE_TASKS:
    raise ConfigError(f"--task {name}: unknown or unsupported GLUE task (one of "
                      f"{', '.join(GLUE_TASKS)})")
  label_type, names = int, ()
  if sub == "stsb":  # a similarity score in [0, 5]: one output, squared error
    kind, n, label_type, fields = "regression", 1, float, ["sentence1", "sentence2"]
  else:
    kind = "classification"
    fields, n, names = glue_layout(name)
  def glue(split):
    return lambda: Records(tfds_source(name, split, data_dir)[1],
                           classification_fields(fields, label_type))
  all_langs = (("validation_matched", "validation_mismatched") if sub == "mnli"
               else ("validation",))
  evals = {s: glue(s) for s in all_langs}
  task = Task(name, kind, n, glue("train"), evals, GLUE_METRICS.get(sub, "accuracy"),
              label_names=names)
  return task, all_langs, label_type


def _select(task: Task, langs: Sequence[str], all_langs) -> Task:
  """Only the evaluation sets of `langs` (mlqa-gxlt: the pairs of two of them)."""
  unknown = [l for l in langs if l not in all_langs]
  if unknown:
    raise ConfigError(f"--langs: {task.name} has no {unknown[0]!r} (has {', '.join(all_langs)})")
  if task.pairs:  # mlqa-gxlt: the pairs whose two languages are both asked for
    evals = {k: v for k, v in task.evals.items() if all(l in langs for l in task.pairs[k])}
    return dataclasses.replace(task, evals=evals, pairs={k: task.pairs[k] for k in evals})
  return dataclasses.replace(task, evals={l: task.evals[l] for l in langs})


def get_task(name: str, data_dir: str | None = None, langs: Sequence[str] | None = None,
             train_jsonl: str | None = None, eval_jsonl: dict | None = None,
             num_labels: int = 0, mlqa_data: str | None = None,
             mlqa_split: str = "test") -> Task:
  """The task called `name`; JSONL files, where given, replace the TFDS train / eval data,
  and mlqa_data (MLQA's release files) replaces TFDS's mlqa."""
  eval_jsonl = dict(eval_jsonl or {})
  if mlqa_data and name not in ("mlqa", "mlqa-gxlt"):
    raise ConfigError(f"--mlqa-data is for --task mlqa or mlqa-gxlt, not {name}")
  if name == "xnli":
    task, all_langs, label_type = _xnli(data_dir)
  elif name in ("mlqa", "mlqa-gxlt"):
    task, all_langs, label_type = _mlqa(name, data_dir, mlqa_data, mlqa_split, eval_jsonl)
  elif name.startswith("glue/"):
    task, all_langs, label_type = _glue(name, data_dir)
  else:
    raise ConfigError(f"--task {name!r}: unknown (xnli, mlqa, mlqa-gxlt or glue/<task>)")
  data_kind = "span" if task.kind == "span" else "classification"
  read = functools.partial(jsonl_records, kind=data_kind, label_type=label_type,
                           label_names=task.label_names)
  if train_jsonl:
    task.train = ((lambda: usable_answers(train_jsonl, read(train_jsonl)))
                  if data_kind == "span" else (lambda: read(train_jsonl)))
  if eval_jsonl:  # local files replace the TFDS evaluation sets entirely
    task.evals = {l: (lambda p=p: read(p)) for l, p in eval_jsonl.items()}
  elif langs:
    task = _select(task, langs, all_langs)
  if task.kind == "span":
    where = "--eval-jsonl" if eval_jsonl else f"--task {name}"
    task.score_langs = {k: _span_score_lang(task.pairs[k][0] if task.pairs else k, where)
                        for k in task.evals}
  if num_labels:
    if task.kind == "regression" and int(num_labels) != 1:
      raise ConfigError(f"--num-labels: {name} is a regression (one output), got {num_labels}")
    task.num_labels = int(num_labels)
  if task.kind == "classification" and task.num_labels < 2:
    raise ConfigError(f"--task {name}: number of labels unknown; pass --num-labels")
  return task
