"""The tokenizer interface used by training, evaluation and export, and our own sentencepiece
models (trained here; they reserve [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4).

Other kinds (XLM-R's sentencepiece, HF files) are in pretrained_tokenizers.py; the one loader
of every kind, `load(path, kind)`, is in tokenizers.py.
"""
from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm

from bepa_jax.errors import InputError, one_line

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def load_sentencepiece(path: str) -> spm.SentencePieceProcessor:
  """A sentencepiece model file; a file that is not one is an InputError naming it."""
  try:
    return spm.SentencePieceProcessor(model_file=path)
  except (RuntimeError, OSError) as e:
    raise InputError(f"{path}: not a sentencepiece model ({one_line(e)})") from None


class Tokenizer:
  """What the rest of the code needs from a tokenizer."""
  vocab_size: int
  pad_id: int
  unk_id: int
  cls_id: int
  sep_id: int
  mask_id: int
  threads = 0  # sentencepiece threads per call: 0 = every core (a data worker uses one)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids without special tokens."""
    raise NotImplementedError

  def decode(self, ids: Sequence[int]) -> str:
    raise NotImplementedError

  @property
  def special_ids(self) -> frozenset[int]:
    return frozenset((self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id))

  def fingerprint(self) -> str:
    """A hash of what the ids mean (the model file's bytes, or the vocabulary), not of where
    it lies: a resume checks it (other ids = another data stream and another embedding).
    Computed once per tokenizer: every checkpoint save asks for it."""
    cached = getattr(self, "_fingerprint", None)
    if cached is not None:
      return cached
    import hashlib
    h = hashlib.sha1(f"{type(self).__name__}:{self.vocab_size}:{sorted(self.special_ids)}"
                     .encode())
    path = getattr(self, "model_path", None)
    if path and os.path.isfile(path):
      with open(path, "rb") as f:
        h.update(f.read())
    else:
      h.update(repr(sorted(self.vocabulary().items())).encode())
    self._fingerprint = h.hexdigest()[:16]
    return self._fingerprint

  def vocabulary(self) -> dict[str, int]:
    """piece -> id (for `fingerprint` when there is no single model file)."""
    raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model trained by this project (specials as above)."""

  def __init__(self, model_path: str):
    if not os.path.exists(model_path):
      raise InputError(f"sentencepiece model not found: {model_path}")
    self.model_path = model_path
    self.sp = load_sentencepiece(model_path)
    self.vocab_size = self.sp.get_piece_size()
    ids = {p: self.sp.piece_to_id(p) for p in SPECIAL_TOKENS}
    unk = self.sp.unk_id()
    missing = [p for p, i in ids.items() if i == unk and p != "[UNK]"]
    if missing:
      raise InputError(f"{model_path}: sentencepiece model lacks special tokens {missing}")
    self.pad_id, self.unk_id = ids["[PAD]"], ids["[UNK]"]
    self.cls_id, self.sep_id, self.mask_id = ids["[CLS]"], ids["[SEP]"], ids["[MASK]"]

  def encode_batch(self, texts):
    return self.sp.encode(list(texts), out_type=int,
                          num_threads=self.threads or os.cpu_count() or 1)

  def decode(self, ids):
    return self.sp.decode([i for i in ids if i not in self.special_ids])


def train_sentencepiece(texts: Iterable[str], out_dir: str, vocab_size: int,
                        model_type: str = "unigram") -> str:
  """Trains a sentencepiece model in-process; returns the path of `spm.model` in out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=buf, vocab_size=int(vocab_size),
      model_type=model_type, character_coverage=0.9995, hard_vocab_limit=False,
      pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece="[PAD]", unk_piece="[UNK]",
      control_symbols=["[CLS]", "[SEP]", "[MASK]"], input_sentence_size=2_000_000,
      shuffle_input_sentence=True, num_threads=os.cpu_count() or 1, minloglevel=2)
  path = os.path.join(out_dir, "spm.model")
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)  # atomic: a half-written model is never picked up
  return path
