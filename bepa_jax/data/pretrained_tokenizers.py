"""Existing tokenizers behind the `Tokenizer` interface: XLM-R's sentencepiece, HF tokenizer.json.

XLM-R (fairseq) shifts sentencepiece ids to make room for its specials:
  <s>=0 <pad>=1 </s>=2 <unk>=3, piece id = spm id + 1 (spm's own <unk>/<s>/</s> at 0..2
  are replaced by fairseq's), <mask> = the last id; vocab = spm pieces + 2 (250,002).
An HF `tokenizer.json` (mBERT WordPiece, or RoBERTa-style BPE) is read with `tokenizers`;
its specials are looked up by name ([CLS]... or <s>...).
"""
from __future__ import annotations

import os

import numpy as np

from bepa_jax.data.tokenizer import Tokenizer, load_sentencepiece
from bepa_jax.errors import ConfigError, InputError, one_line


class XlmrSentencePieceTokenizer(Tokenizer):
  """A sentencepiece model with fairseq's (XLM-R's) id layout."""
  OFFSET = 1

  def __init__(self, model_path: str):
    if not os.path.exists(model_path):
      raise InputError(f"sentencepiece model not found: {model_path}")
    self.model_path = model_path
    self.sp = load_sentencepiece(model_path)
    n = self.sp.get_piece_size()
    self.cls_id, self.pad_id, self.sep_id, self.unk_id = 0, 1, 2, 3
    self.vocab_size = n + self.OFFSET + 1
    self.mask_id = self.vocab_size - 1
    self._spm_unk = self.sp.unk_id()
    # spm control ids (<unk>, <s>, </s>) never appear as pieces of encoded text except unk
    lut = np.arange(n, dtype=np.int64) + self.OFFSET
    lut[self._spm_unk] = self.unk_id
    self._lut = lut

  def encode_batch(self, texts):
    ids = self.sp.encode(list(texts), out_type=int,
                         num_threads=self.threads or os.cpu_count() or 1)
    lut = self._lut
    return [lut[np.asarray(t, np.int64)].tolist() if t else [] for t in ids]

  def decode(self, ids):
    pieces = [int(i) - self.OFFSET for i in ids if 3 + self.OFFSET <= i < self.mask_id]
    return self.sp.decode(pieces)


_HF_SPECIALS = {
    "pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"), "mask": ("[MASK]", "<mask>"),
}


class HFJsonTokenizer(Tokenizer):
  """An HF `tokenizer.json` (e.g. mBERT's WordPiece) through the `tokenizers` package."""

  def __init__(self, path: str):
    try:
      from tokenizers import Tokenizer as _HF
    except ImportError:
      raise ConfigError("tokenizer.kind=hf_json needs the tokenizers package: "
                        "pip install 'bepa-jax[hf]'") from None
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
      raise InputError(f"tokenizer.json not found: {path}")
    try:
      self.tk = _HF.from_file(path)
    except Exception as e:  # noqa: BLE001 -- a malformed file: one line for the user
      raise InputError(f"{path}: not a valid tokenizer.json ({one_line(e)})") from None
    self.model_path = path
    self.tk.no_padding()
    self.tk.no_truncation()
    self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
    for role, names in _HF_SPECIALS.items():
      ids = [self.tk.token_to_id(n) for n in names]
      ids = [i for i in ids if i is not None]
      if not ids:
        raise InputError(f"{path}: no {role} token (looked for {', '.join(names)})")
      setattr(self, f"{role}_id", ids[0])

  def encode_batch(self, texts):
    return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids):
    return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)


class HFTokenizer(Tokenizer):
  """A `transformers` tokenizer behind the project's Tokenizer interface (local files only)."""

  def __init__(self, path: str):
    try:
      from transformers import AutoTokenizer
    except ImportError:
      raise InputError(f"{path}: reading an HF tokenizer needs `pip install bepa-jax[hf]`") from None
    try:
      self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 -- transformers raises many kinds: one line naming it
      raise InputError(f"{path}: not a loadable HF tokenizer ({one_line(e)})") from None
    t = self.tok
    self.vocab_size = len(t)
    self.pad_id, self.unk_id = t.pad_token_id, t.unk_token_id
    self.cls_id = t.cls_token_id if t.cls_token_id is not None else t.bos_token_id
    self.sep_id = t.sep_token_id if t.sep_token_id is not None else t.eos_token_id
    self.mask_id = t.mask_token_id
    if None in (self.pad_id, self.cls_id, self.sep_id):
      raise InputError(f"{path}: tokenizer lacks a pad, [CLS]/<s> or [SEP]/</s> token")

  def encode_batch(self, texts):
    return self.tok(list(texts), add_special_tokens=False)["input_ids"]

  def vocabulary(self):
    return self.tok.get_vocab()

  def decode(self, ids):
    return self.tok.decode(ids, skip_special_tokens=True)
