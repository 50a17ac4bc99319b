"""The README.md of an export: YAML front matter the Hub reads (language, license, library,
pipeline, tags, base_model, datasets, a model-index of the workdir's latest bepa-eval report)
and a body that says how the model was trained and how to use it.

Every figure comes from the workdir: the saved config (objective, B, the data), the exported
step, metrics.jsonl (tokens per step) and bepa-eval's report.json; nothing is made up, and
what is not known is said to be unknown.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re

import yaml

from bepa_jax.config import defaults
from bepa_jax.data import sources

README = "README.md"
TAGS = ("bepa", "sentence-transformers", "feature-extraction", "sentence-similarity",
        "multilingual", "jax", "flax")


@dataclasses.dataclass(frozen=True)
class Export:
  """What the exporter knows about the directory it writes."""
  name: str             # the directory's name (the snippets load it by this name)
  step: int             # the checkpoint exported
  family: str           # bert | xlmr
  hidden_size: int
  vocab_size: int
  max_seq_length: int   # sentence_bert_config.json's
  pooling: str          # what SentenceTransformer(out) applies: cls | mean | ...
  base_model: str = ""  # the Hub id of init.hf_dir's model ("" when trained from scratch)


# ----------------------------------------------------------------------------- the run's facts
def languages(config) -> list[str]:
  """The run's languages: data.pairs, else what its sources name (the embedded corpus's
  data.languages, aligned files' {en,de}, tatoeba:DIR:deu,fra, mono:LANG=...)."""
  pairs = sources.parse_pairs(str(config.data.pairs))
  if pairs:
    return list(dict.fromkeys(l for p in pairs for l in p))
  out = []
  for spec in sources.parse_specs(str(config.data.source)):
    if spec.kind == "embedded":
      out += _split(spec.arg) or _split(str(config.data.languages))
    elif spec.kind == "aligned":
      out += list(sources.expand_aligned(spec.arg))
    elif spec.kind == "tatoeba" and ":" in spec.arg:
      named = _split(spec.arg.partition(":")[2])
      out += named + (["eng"] if named else [])
    elif spec.kind == "mono":
      out.append(spec.arg.partition("=")[0].strip())
  return list(dict.fromkeys(l for l in out if l))


def _split(text: str) -> list[str]:
  return [x.strip() for x in text.split(",") if x.strip()]


def datasets(config) -> list[str]:
  """Datasets the sources name (tfds:NAME[:SPLIT] -> NAME); local files name none."""
  return list(dict.fromkeys(spec.arg.partition(":")[0] for spec in
                            sources.parse_specs(str(config.data.source)) if spec.kind == "tfds"))


def loss_options(config) -> dict:
  """loss.* that differ from the defaults (config/defaults.py)."""
  default = defaults.get_config().loss
  return {k: config.loss[k] for k in default if k in config.loss and config.loss[k] != default[k]}


def hub_id(path: str) -> str:
  """A name for init.hf_dir's model: ORG/NAME of a Hub cache path (models--ORG--NAME), else
  the last folder that is not a generic one (model, snapshots, a commit hash)."""
  m = re.search(r"models--([^/]+?)--([^/]+)", path)
  if m:
    return f"{m.group(1)}/{m.group(2)}"
  for part in reversed(os.path.normpath(path).split(os.sep)):
    if part and part not in ("model", "models", "snapshots") and not re.fullmatch(r"[0-9a-f]{40}",
                                                                                  part):
      return part
  return path


def tokens_seen(workdir: str, step: int) -> int | None:
  """steps x the real (non-pad) tokens per step that metrics.jsonl logged last (its
  real_tokens_per_sec / steps_per_sec, averaged since the run started); None if not logged."""
  if step == 0:
    return 0
  per_step = None
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      for line in f:
        try:
          rec = json.loads(line)
          tps, sps = rec.get("train/real_tokens_per_sec"), rec.get("train/steps_per_sec")
          if int(rec["step"]) <= step and tps and sps and tps > 0 and sps > 0:
            per_step = tps / sps
        except (ValueError, KeyError, TypeError):
          continue  # a line cut by a crash
  except OSError:
    return None
  return None if per_step is None else int(round(step * per_step))


def latest_eval(workdir: str) -> tuple[str, dict] | None:
  """(path, this model's report) of the newest bepa-eval report.json in the workdir
  (WORKDIR/eval/report.json by default, or any WORKDIR/*/report.json) that scored it."""
  here = os.path.realpath(workdir)
  found = []
  for path in glob.glob(os.path.join(workdir, "*", "report.json")):
    try:
      with open(path, encoding="utf-8") as f:
        models = json.load(f)["models"]
      mine = [r for r in models.values()
              if os.path.realpath(str(r["model"]["path"])) == here]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      continue
    if mine:
      found.append((os.path.getmtime(path), path, mine[0]))
  if not found:
    return None
  _, path, report = max(found)
  return path, report


# ----------------------------------------------------------------------------- model-index
def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def retrieval_sets(report: dict):
  """(set name, {pair: {scoring: {direction: accuracy}}}) of every scored set."""
  ret = report.get("retrieval", {})
  for lang, pairs in ret.get("tatoeba", {}).items():
    yield f"tatoeba/{lang}", pairs
  for name, pairs in ret.items():
    if not name.startswith("tatoeba"):
      yield name, pairs


def model_index(name: str, report: dict) -> list[dict]:
  """The Hub's model-index: top-1 retrieval per set, pair and direction (accuracy in [0, 1],
  as report.json holds it), and the PC1 share and effective rank of each pooling."""
  results = []
  for set_name, pairs in retrieval_sets(report):
    for pair, entry in pairs.items():
      metrics = [{"type": "accuracy", "name": f"top-1 {direction} ({scoring})", "value": v}
                 for scoring, acc in entry.items() for direction, v in acc.items()
                 if _finite(v)]
      if metrics:
        results.append({"task": {"type": "bitext-mining", "name": "Bitext retrieval"},
                        "dataset": {"type": set_name.split("/")[0], "name": set_name,
                                    "config": pair, "split": "test"},
                        "metrics": metrics})
  diag = [{"type": key, "name": f"{label} ({pool})", "value": d[key]}
          for pool, d in report.get("diagnostics", {}).items()
          for key, label in (("pc1_share", "PC1 variance share"),
                             ("effective_rank", "effective rank")) if _finite(d.get(key))]
  if diag:
    sets = ", ".join(report.get("sets", {})) or "bepa-eval"
    results.append({"task": {"type": "feature-extraction", "name": "Embedding-space diagnostics"},
                    "dataset": {"type": "bepa-eval", "name": sets, "split": "test"},
                    "metrics": diag})
  return [{"name": name, "results": results}] if results else []


# ----------------------------------------------------------------------------- the card
def front_matter(config, export: Export, report: dict | None) -> dict:
  front = {}
  langs = languages(config)
  if langs:
    front["language"] = langs
  front.update({"license": "apache-2.0", "library_name": "sentence-transformers",
                "pipeline_tag": "sentence-similarity", "tags": list(TAGS)})
  if export.base_model:
    front["base_model"] = export.base_model
  if datasets(config):
    front["datasets"] = datasets(config)
  index = model_index(export.name, report) if report else []
  if index:
    front["model-index"] = index
  return front


def render(config, workdir: str, export: Export) -> str:
  """README.md: YAML front matter, then training, evaluation and usage."""
  found = latest_eval(workdir)
  report = found[1] if found else None
  front = yaml.safe_dump(front_matter(config, export, report), sort_keys=False,
                         allow_unicode=True, width=100)
  parts = [f"---\n{front}---\n", f"# {export.name}\n", _summary(export),
           _training(config, workdir, export),
           _evaluation(workdir, found) if found else "## Evaluation\n\nNo bepa-eval report in "
           "the workdir when this was exported.\n",
           _usage(export)]
  return "\n".join(parts)


def write(out_dir: str, config, workdir: str, export: Export) -> str:
  path = os.path.join(out_dir, README)
  with open(path, "w", encoding="utf-8") as f:
    f.write(render(config, workdir, export))
  return path


def _summary(e: Export) -> str:
  pool = {"cls": "the L2-normalised last-layer [CLS]", "mean": "the L2-normalised mean of the "
          "last layer over real tokens"}.get(e.pooling, f"{e.pooling} pooling, L2-normalised")
  base = f", continued from `{e.base_model}`" if e.base_model else ""
  return (f"A {'BERT' if e.family == 'bert' else 'XLM-R'} encoder ({e.hidden_size}-d) "
          f"pretrained with BEPA (MLM + global-batch InfoNCE) by bepa-jax{base}. Its sentence "
          f"embedding is {pool} (max {e.max_seq_length} tokens). The directory is a "
          f"`{'BertForMaskedLM' if e.family == 'bert' else 'XLMRobertaForMaskedLM'}` for "
          f"transformers and a sentence-transformers model.\n")


def _training(config, workdir: str, e: Export) -> str:
  B = int(config.train.global_batch)
  tokens = tokens_seen(workdir, e.step)
  tok_text = ("unknown (metrics.jsonl logged no throughput)" if tokens is None
              else f"{tokens:,}" + (" (steps x the real tokens per step metrics.jsonl logged)"
                                    if e.step else ""))
  opts = loss_options(config)
  lines = ["## Training", "",
           "Objective: L = L_mlm + λ · L_con, with L_con the symmetric InfoNCE over the global "
           "batch of B sentence pairs, on the L2-normalised last-layer [CLS] "
           f"(λ = loss.weight = {config.loss.weight}, τ = loss.temperature = "
           f"{config.loss.temperature}).", "",
           "| | |", "|---|---|",
           "| loss options (not the defaults) | " + (", ".join(f"`{k}={v}`" for k, v in
                                                        opts.items()) or "none") + " |",
           f"| B (train.global_batch) | {B} |",
           f"| steps | {e.step} |",
           f"| sentence pairs seen (steps x B) | {e.step * B:,} |",
           f"| tokens seen | {tok_text} |",
           f"| tokenizer | {_tokenizer(config, e)} |",
           f"| data | `{config.data.source}`" + (f" ({', '.join(languages(config))})"
                                                 if languages(config) else "") + " |",
           f"| max_length | {config.data.max_length} |"]
  if e.base_model:
    lines.append(f"| base model | `{e.base_model}` |")
  return "\n".join(lines) + "\n"


def _tokenizer(config, e: Export) -> str:
  t = config.tokenizer
  if t.path:
    what = f"`{os.path.basename(str(t.path).rstrip('/'))}` ({t.kind})"
  elif config.init.hf_dir:
    what = "the base model's"
  else:
    what = f"sentencepiece {t.model_type}, trained on the run's data"
  return f"{what}, {e.vocab_size:,} ids"


def _evaluation(workdir: str, found) -> str:
  path, report = found
  rows = []
  for set_name, pairs in retrieval_sets(report):
    for pair, entry in pairs.items():
      for scoring, acc in entry.items():
        for direction, v in acc.items():
          if _finite(v):
            rows.append(f"| {set_name} | {direction} | {scoring} | {100 * v:.1f} |")
  diag = [f"| {pool} | {d['pc1_share']:.3f} | {d['effective_rank']:.2f} |"
          for pool, d in report.get("diagnostics", {}).items()
          if _finite(d.get("pc1_share")) and _finite(d.get("effective_rank"))]
  sets = "; ".join(f"{name} ({', '.join(s.get('languages', []))}: {s.get('sentences')} "
                   f"sentences)" for name, s in report.get("sets", {}).items())
  lines = ["## Evaluation", "", f"bepa-eval's `{os.path.relpath(path, workdir)}` on {sets} "
           "(top-1 retrieval accuracy, %):", "", "| set | direction | scoring | top-1 |",
           "|---|---|---|---|", *rows]
  if diag:
    lines += ["", "| pooling | PC1 variance share | effective rank |", "|---|---|---|", *diag]
  return "\n".join(lines) + "\n"


def _usage(e: Export) -> str:
  pool = ("emb = hidden[:, 0]  # [CLS]" if e.pooling == "cls" else
          "m = batch['attention_mask'].unsqueeze(-1).float()\n"
          "emb = (hidden * m).sum(1) / m.sum(1)  # mean over real tokens")
  if e.pooling not in ("cls", "mean"):
    pool = "emb = ...  # the pooling of 1_Pooling/config.json"
  return "\n".join([
      "## Usage", "", "sentence-transformers (the embedding bepa-eval scores):", "",
      "```python", "from sentence_transformers import SentenceTransformer",
      f'model = SentenceTransformer("{e.name}")',
      'emb = model.encode(["A sentence.", "Ein Satz."])  # L2-normalised: cosine = dot product',
      "```", "", "transformers (the pooler is not trained: its warning is expected):", "",
      "```python", "import torch", "from transformers import AutoModel, AutoTokenizer",
      f'tok = AutoTokenizer.from_pretrained("{e.name}")',
      f'model = AutoModel.from_pretrained("{e.name}").eval()',
      f'batch = tok(["A sentence.", "Ein Satz."], padding=True, truncation=True, '
      f'max_length={e.max_seq_length}, return_tensors="pt")',
      "with torch.no_grad():", "  hidden = model(**batch).last_hidden_state", pool,
      "emb = torch.nn.functional.normalize(emb, dim=-1)", "```", "",
      "bepa-jax (retrieval and embedding-space diagnostics):", "", "```bash",
      f"bepa-eval --hf-dir {e.name} --tatoeba TATOEBA_DIR --langs deu,fra", "```", ""])
