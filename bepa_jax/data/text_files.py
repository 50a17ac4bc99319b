"""Text files as lines: read whole (plain or gzip), or through an index of line offsets.

A line that is not UTF-8 is an InputError naming the file and line (data.invalid_utf8=error), or
None (skip): the caller counts and drops it. A NUL byte inside a line is dropped from its text
(else it becomes a tokenizer piece of its own), the lines affected counted in one warning line.
"""
from __future__ import annotations

import codecs
import gzip
import logging
import os
import zlib

import numpy as np

from bepa_jax.data.records import LoadStats, TextPolicy
from bepa_jax.errors import InputError

log = logging.getLogger("bepa")
NUL = "\x00"


def _invalid_utf8(where: str, e: UnicodeDecodeError) -> InputError:
  return InputError(f"{where}: invalid UTF-8 (byte {e.start}); set data.invalid_utf8=skip to "
                    f"drop such lines")


def open_binary(path: str):
  if not os.path.exists(path):
    raise InputError(f"file not found: {path}")
  if os.path.isdir(path):
    raise InputError(f"expected a file, got a directory: {path}")
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


# Byte-order marks of encodings other than UTF-8: such a file is named, never read line by line
# (its newlines are two or four bytes, so the line count would be wrong before any error).
_OTHER_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
               (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def check_first_line(path: str, raw: bytes) -> bytes:
  """The first line without a UTF-8 byte-order mark; a UTF-16/32 file is an InputError."""
  for bom, name in _OTHER_BOMS:
    if raw.startswith(bom):
      raise InputError(f"{path}: {name} text (byte-order mark {bom.hex(' ').upper()}), not "
                       f"UTF-8: convert it, e.g. iconv -f {name} -t UTF-8")
  return raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw


def _nul_lines(path: str, count: int, stats: LoadStats | None) -> None:
  """One warning line for the lines of `path` that held NUL bytes (dropped), and the count."""
  if count:
    log.warning("%s: %d line(s) hold NUL bytes: the NULs are dropped from the text", path, count)
    if stats is not None:
      stats.nul_lines += count


def read_lines(path: str, policy: TextPolicy, stats: LoadStats | None = None
               ) -> list[str | None]:
  """Every line of a plain or gzip file; None marks a line that is not UTF-8 (when skipped).
  A UTF-8 byte-order mark is dropped; a UTF-16/32 file is refused, naming its encoding; NUL
  bytes are dropped from the text, the lines that held them counted (`stats`)."""
  out, nul = [], 0
  try:
    with open_binary(path) as f:
      for lineno, raw in enumerate(f, start=1):
        if lineno == 1:
          raw = check_first_line(path, raw)
        try:
          text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
          if policy.invalid_utf8 == "error":
            raise _invalid_utf8(f"{path}:{lineno}", e) from None
          text = None
        if text and NUL in text:
          text, nul = text.replace(NUL, ""), nul + 1
        out.append(text)
  except (OSError, EOFError, zlib.error) as e:  # a truncated, corrupt or non-gzip .gz file
    if isinstance(e, InputError):
      raise
    raise InputError(f"{path}: cannot read: {e}") from None
  _nul_lines(path, nul, stats)
  return out


class IndexedLines:
  """Random access to the lines of a plain text file through an index of line offsets."""

  def __init__(self, path: str, policy: TextPolicy, stats: LoadStats | None = None,
               chunk: int = 16 << 20):
    self.path, self.policy = path, policy
    ends, nuls, size = [], [], 0
    with open(path, "rb") as f:
      while True:
        buf = f.read(chunk)
        if not buf:
          break
        arr = np.frombuffer(buf, np.uint8)
        ends.append(np.flatnonzero(arr == 10) + size + 1)
        nuls.append(np.flatnonzero(arr == 0) + size)
        size += len(buf)
    ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if size and (not len(ends) or ends[-1] != size):   # last line without a newline
      ends = np.append(ends, size)
    self.offsets = np.concatenate([[0], ends]).astype(np.int64)
    nuls = np.concatenate(nuls) if nuls else np.zeros(0, np.int64)
    _nul_lines(path, len(np.unique(np.searchsorted(ends, nuls, side="right"))), stats)
    self._fd = os.open(path, os.O_RDONLY)

  def __len__(self):
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> str | None:
    a, b = int(self.offsets[i]), int(self.offsets[i + 1])
    raw = os.pread(self._fd, b - a, a)
    try:
      return raw.decode("utf-8").rstrip("\r\n").replace(NUL, "")
    except UnicodeDecodeError as e:
      if self.policy.invalid_utf8 == "error":
        raise _invalid_utf8(f"{self.path}:{i + 1}", e) from None
      return None

  def __getstate__(self):
    raise TypeError("IndexedLines holds an open file")
