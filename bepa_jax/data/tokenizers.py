"""The one tokenizer loader: `load(path, kind)` for every kind the project reads.

  spm          our sentencepiece model (data/tokenizer.py)
  xlmr_spm     XLM-R's sentencepiece.bpe.model with fairseq's ids (data/pretrained_tokenizers.py)
  hf_json      an HF tokenizer.json (mBERT WordPiece, RoBERTa-style BPE)
  transformers an HF tokenizer directory (tokenizer_config.json), read with `transformers`
  auto         found from the path: a file by its name, a directory by TOKENIZER_FILES
"""
from __future__ import annotations

import os

from bepa_jax.data.pretrained_tokenizers import (HFJsonTokenizer, HFTokenizer,
                                                 XlmrSentencePieceTokenizer)
from bepa_jax.data.tokenizer import SentencePieceTokenizer, Tokenizer
from bepa_jax.errors import ConfigError, InputError

KINDS = ("spm", "xlmr_spm", "hf_json")  # tokenizer.kind (of tokenizer.path)

# Files that hold a tokenizer, in the order a directory is searched, with their kind.
TOKENIZER_FILES = (("spm.model", "spm"), (os.path.join("tokenizer", "spm.model"), "spm"),
                   ("tokenizer.json", "hf_json"), ("sentencepiece.bpe.model", "xlmr_spm"))


def find(path: str) -> tuple[str, str] | None:
  """(kind, file) of the tokenizer at `path` (a file, or a directory searched in
  TOKENIZER_FILES order; "transformers" for a directory with only tokenizer_config.json)."""
  if os.path.isfile(path):
    name = os.path.basename(path)
    return ({"tokenizer.json": "hf_json", "sentencepiece.bpe.model": "xlmr_spm"}.get(name, "spm"),
            path)
  for name, kind in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(path, name)):
      return kind, os.path.join(path, name)
  if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
    return "transformers", path
  return None


def load(path: str, kind: str = "auto") -> Tokenizer:
  """The tokenizer at `path` of `kind` (see the module docstring); errors are one line."""
  if kind == "auto":
    found = find(path)
    if found is None:
      raise InputError(f"{path}: no tokenizer found ({', '.join(n for n, _ in TOKENIZER_FILES)})")
    kind, path = found
  if kind == "transformers":
    return HFTokenizer(path)
  if kind not in KINDS:
    raise ConfigError(f"tokenizer.kind={kind!r} is not one of {', '.join(KINDS)}")
  if kind == "spm":
    return SentencePieceTokenizer(path)
  if kind == "xlmr_spm":
    return XlmrSentencePieceTokenizer(path)
  return HFJsonTokenizer(path)
