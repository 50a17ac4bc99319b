"""A bepa-train workdir -> a HuggingFace directory (PyTorch-layout safetensors).

  bepa-export --workdir DIR [--step N] [--pooling cls|mean] --out HF_DIR

Writes config.json + model.safetensors (BertForMaskedLM or XLMRobertaForMaskedLM by model
family, see hf/convert.py) and tokenizer files, so that offline
`AutoModelForMaskedLM.from_pretrained(HF_DIR)` and `AutoTokenizer.from_pretrained(HF_DIR)`
reproduce our logits and our token ids; the sentence-transformers layout (modules.json,
1_Pooling/, ...), so that `SentenceTransformer(HF_DIR).encode` gives bepa-eval's embeddings;
and a model card (README.md). An existing non-empty --out is never overwritten.
"""
from __future__ import annotations

import os
import shutil
import types

from bepa_jax.checkpoint import reader
from bepa_jax.config import load as config_load
from bepa_jax.data import factory
from bepa_jax.errors import InputError
from bepa_jax.hf import convert, files, model_card
from bepa_jax.hf import init as hf_init
from bepa_jax.model import EncoderConfig

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


def export_xlmr_tokenizer(spm_path: str, out_dir: str) -> None:
  """XLM-R's sentencepiece model (fairseq's ids, data/pretrained_tokenizers.py) as an HF
  XLMRobertaTokenizer: converted to tokenizer.json, since transformers 5 no longer reads the
  .model file itself. Same ids as ours, <s> s </s>."""
  from transformers import XLMRobertaTokenizer
  from transformers.convert_slow_tokenizer import XLMRobertaConverter

  specials = {"<s>": 0, "</s>": 2}  # XlmrSentencePieceTokenizer's cls / sep
  source = types.SimpleNamespace(vocab_file=spm_path, convert_tokens_to_ids=specials.get)
  XLMRobertaTokenizer(tokenizer_object=XLMRobertaConverter(source).converted()).save_pretrained(
      out_dir)
  shutil.copyfile(spm_path, os.path.join(out_dir, "sentencepiece.bpe.model"))


def export_tokenizer(config, workdir: str, out_dir: str) -> None:
  """The tokenizer training used: our sentencepiece model, or the files of an imported one."""
  path = str(config.tokenizer.path)
  kind = str(config.tokenizer.kind)
  if not path and config.init.hf_dir:  # the tokenizer came with the HF checkpoint
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
  if kind == "xlmr_spm" and os.path.isfile(path):
    export_xlmr_tokenizer(path, out_dir)
    return
  src = path if os.path.isdir(path) else os.path.dirname(path)
  copied = [f for f in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
  if not copied:
    raise InputError(f"{src}: no HF tokenizer files ({', '.join(HF_TOKENIZER_FILES)}) to export")
  for f in copied:
    shutil.copyfile(os.path.join(src, f), os.path.join(out_dir, f))


def load_workdir_params(workdir: str, step: int | None = None):
  """(config, EncoderConfig, numpy params) of checkpoint `step` (default: the latest)."""
  config = config_load.read_saved(workdir)
  step, params = reader.read_params(workdir, step)
  vocab = int(config.model.vocab_size) or _tokenizer_vocab(config, workdir)
  return config, EncoderConfig.from_config(config.model, vocab_size=vocab), params, step


def _tokenizer_vocab(config, workdir):
  return factory.load_tokenizer(config, workdir, train_if_missing=False,
                                hf_dir=hf_init.tokenizer_dir(config)).vocab_size


def sentence_transformers_layout(config, model_cfg, out_dir: str,
                                 pooling: str | None = None) -> str:
  """Writes the sentence-transformers files; returns the pooling they apply. A run started
  from a sentence-transformers model keeps its modules (e.g. all-MiniLM-L6-v2's mean pooling)
  unless `pooling` is given; any other run gets Transformer -> `pooling` ([CLS] by default,
  bepa-eval's "cls") -> Normalize, with max_seq_length = data.max_length."""
  src = str(config.init.hf_dir)
  if pooling is None and src and os.path.isdir(src) and files.copy_sentence_transformers(
      src, out_dir):
    return files.st_pooling(src) or "unknown"
  pooling = pooling or "cls"
  files.write_sentence_transformers(out_dir, dim=model_cfg.hidden_size,
                                    max_seq_length=int(config.data.max_length), pooling=pooling)
  return pooling


def export(workdir: str, out_dir: str, step: int | None = None, pooling: str | None = None,
           base_model: str | None = None) -> str:
  """Writes `out_dir` whole or not at all (built in a temporary sibling, then renamed).

  `pooling` (cls | mean): the sentence embedding of the sentence-transformers layout;
  `base_model`: the Hub id the model card names for init.hf_dir (default: from its path)."""
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise InputError(f"{out_dir}: exists and is not empty; refusing to overwrite")
  if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
    raise InputError(f"{out_dir}: exists and is not a directory; refusing to overwrite")
  if pooling is not None and pooling not in files.ST_POOLINGS:
    raise InputError(f"pooling {pooling!r} is not one of {', '.join(files.ST_POOLINGS)}")
  config, model_cfg, params, step = load_workdir_params(workdir, step)
  tmp = out_dir.rstrip("/") + ".tmp-export"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    convert.save_hf(tmp, params, model_cfg)
    export_tokenizer(config, workdir, tmp)
    used = sentence_transformers_layout(config, model_cfg, tmp, pooling)
    hf_dir = str(config.init.hf_dir)
    model_card.write(tmp, config, workdir, model_card.Export(
        name=os.path.basename(os.path.normpath(out_dir)), step=int(step),
        family=model_cfg.family, hidden_size=model_cfg.hidden_size,
        vocab_size=model_cfg.vocab_size,
        max_seq_length=files.st_max_seq_length(tmp) or int(config.data.max_length),
        pooling=used, base_model=base_model or (model_card.hub_id(hf_dir) if hf_dir else "")))
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(out_dir):
    os.rmdir(out_dir)  # empty, checked above
  os.replace(tmp, out_dir)  # all or nothing
  return out_dir
