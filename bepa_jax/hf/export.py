"""A bepa-train workdir -> a HuggingFace directory (PyTorch-layout safetensors).

  bepa-export --workdir DIR [--step N] --out HF_DIR

Writes config.json + model.safetensors (BertForMaskedLM or XLMRobertaForMaskedLM by model
family, see hf.py) and tokenizer files, so that offline
`AutoModelForMaskedLM.from_pretrained(HF_DIR)` and `AutoTokenizer.from_pretrained(HF_DIR)`
reproduce our logits and our token ids. An existing non-empty --out is never overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
import types

from bepa_jax.errors import InputError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "sentencepiece.bpe.model", "vocab.txt")


def export_sentencepiece_tokenizer(spm_path: str, out_dir: str) -> None:
  """Our [PAD]/[UNK]/[CLS]/[SEP]/[MASK] sentencepiece model as an HF fast tokenizer.

  transformers' SpmConverter reproduces sentencepiece's ids; the post-processor adds
  [CLS] s [SEP] exactly as our pipeline lays sentences out.
  """
  from tokenizers import processors
  from transformers import PreTrainedTokenizerFast
  from transformers.convert_slow_tokenizer import SpmConverter
  from bepa_jax.data.tokenizer import SentencePieceTokenizer

  ours = SentencePieceTokenizer(spm_path)
  tok = SpmConverter(types.SimpleNamespace(vocab_file=spm_path)).converted()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
      special_tokens=[("[CLS]", ours.cls_id), ("[SEP]", ours.sep_id)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                 cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
  fast.save_pretrained(out_dir)
  shutil.copyfile(spm_path, os.path.join(out_dir, "spm.model"))  # our own loaders read this


def export_tokenizer(config, workdir: str, out_dir: str) -> None:
  """The tokenizer training used: our sentencepiece model, or the files of an imported one."""
  path = str(config.tokenizer.path)
  kind = str(config.tokenizer.kind)
  if not path and config.init.hf_dir:  # the tokenizer came with the HF checkpoint
    from bepa_jax.hf import init as hf_init
    src = hf_init.model_dir(config)
    names = HF_TOKENIZER_FILES + ("spm.model",)
    copied = [f for f in names if os.path.isfile(os.path.join(src, f))]
    if not copied:
      raise InputError(f"init.hf_dir: {src}: no tokenizer files ({', '.join(HF_TOKENIZER_FILES)})"
                       f" to export")
    for f in copied:
      shutil.copyfile(os.path.join(src, f), os.path.join(out_dir, f))
    return
  if not path:
    path = os.path.join(workdir, "tokenizer", "spm.model")
  if not os.path.exists(path):
    raise InputError(f"{path}: tokenizer not found")
  if kind == "spm":
    export_sentencepiece_tokenizer(path, out_dir)
    return
  src = path if os.path.isdir(path) else os.path.dirname(path)
  copied = [f for f in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
  if not copied:
    raise InputError(f"{src}: no HF tokenizer files ({', '.join(HF_TOKENIZER_FILES)}) to export")
  for f in copied:
    shutil.copyfile(os.path.join(src, f), os.path.join(out_dir, f))


ST_ROOT_FILES = ("config_sentence_transformers.json",)
ST_ENCODER_FILES = ("sentence_bert_config.json",)


def export_sentence_transformers(st_dir: str, out_dir: str) -> bool:
  """When the run started from a sentence-transformers model, its modules (pooling, normalize,
  ...) go along, with the Transformer module at the top of `out_dir` (where the exported
  encoder is), so SentenceTransformer(out_dir) computes the same kind of embedding."""
  from bepa_jax.hf import convert as hf
  modules = hf.sentence_transformers_modules(st_dir)
  encoder = hf.st_encoder_module(modules) if modules else None
  if encoder is None:
    return False
  enc_dir = hf.resolve_model_dir(st_dir)
  out_modules = []
  for m in modules:
    sub = str(m.get("path") or "")
    if m is encoder:
      m = dict(m, path="")
    elif sub and os.path.isdir(os.path.join(st_dir, sub)):  # e.g. 2_Normalize may have no folder
      shutil.copytree(os.path.join(st_dir, sub), os.path.join(out_dir, sub))
    out_modules.append(m)
  with open(os.path.join(out_dir, hf.ST_MODULES), "w") as f:
    json.dump(out_modules, f, indent=2)
    f.write("\n")
  for name, src in [(n, st_dir) for n in ST_ROOT_FILES] + [(n, enc_dir) for n in ST_ENCODER_FILES]:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
  return True


def load_workdir_params(workdir: str, step: int | None = None):
  """(config, EncoderConfig, numpy params) of checkpoint `step` (default: the latest)."""
  from bepa_jax.checkpoint import reader
  from bepa_jax.config import load as config_load
  from bepa_jax.model import EncoderConfig
  config = config_load.read_saved(workdir)
  step, params = reader.read_params(workdir, step)
  vocab = int(config.model.vocab_size) or _tokenizer_vocab(config, workdir)
  return config, EncoderConfig.from_config(config.model, vocab_size=vocab), params, step


def _tokenizer_vocab(config, workdir):
  from bepa_jax.data import factory
  return factory.load_tokenizer(config, workdir, train_if_missing=False).vocab_size


def export(workdir: str, out_dir: str, step: int | None = None) -> str:
  from bepa_jax.hf import convert as hf
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise InputError(f"{out_dir}: exists and is not empty; refusing to overwrite")
  config, model_cfg, params, step = load_workdir_params(workdir, step)
  tmp = out_dir.rstrip("/") + ".tmp-export"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    hf.save_hf(tmp, params, model_cfg)
    export_tokenizer(config, workdir, tmp)
    if config.init.hf_dir and os.path.isdir(str(config.init.hf_dir)):
      export_sentence_transformers(str(config.init.hf_dir), tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)  # empty, checked above
  os.replace(tmp, out_dir)  # all or nothing
  return out_dir
