"""Text files as lines: read whole (plain or gzip), or through an index of line offsets.

A line that is not UTF-8 is an InputError naming the file and line (data.invalid_utf8=error), or
None (skip): the caller counts and drops it.
"""
from __future__ import annotations

import codecs
import gzip
import os
import zlib

import numpy as np

from bepa_jax.data.records import TextPolicy
from bepa_jax.errors import InputError


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


def read_lines(path: str, policy: TextPolicy) -> list[str | None]:
  """Every line of a plain or gzip file; None marks a line that is not UTF-8 (when skipped).
  A UTF-8 byte-order mark is dropped; a UTF-16/32 file is refused, naming its encoding."""
  out = []
  try:
    with open_binary(path) as f:
      for lineno, raw in enumerate(f, start=1):
        if lineno == 1:
          raw = check_first_line(path, raw)
        try:
          out.append(raw.decode("utf-8").rstrip("\r\n"))
        except UnicodeDecodeError as e:
          if policy.invalid_utf8 == "error":
            raise _invalid_utf8(f"{path}:{lineno}", e) from None
          out.append(None)
  except (OSError, EOFError, zlib.error) as e:  # a truncated, corrupt or non-gzip .gz file
    if isinstance(e, InputError):
      raise
    raise InputError(f"{path}: cannot read: {e}") from None
  return out


class IndexedLines:
  """Random access to the lines of a plain text file through an index of line offsets."""

  def __init__(self, path: str, policy: TextPolicy, chunk: int = 16 << 20):
    self.path, self.policy = path, policy
    ends, size = [], 0
    with open(path, "rb") as f:
      while True:
        buf = f.read(chunk)
        if not buf:
          break
        ends.append(np.flatnonzero(np.frombuffer(buf, np.uint8) == 10) + size + 1)
        size += len(buf)
    ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if size and (not len(ends) or ends[-1] != size):   # last line without a newline
      ends = np.append(ends, size)
    self.offsets = np.concatenate([[0], ends]).astype(np.int64)
    self._fd = os.open(path, os.O_RDONLY)

  def __len__(self):
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> str | None:
    a, b = int(self.offsets[i]), int(self.offsets[i + 1])
    raw = os.pread(self._fd, b - a, a)
    try:
      return raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
      if self.policy.invalid_utf8 == "error":
        raise _invalid_utf8(f"{self.path}:{i + 1}", e) from None
      return None

  def __getstate__(self):
    raise TypeError("IndexedLines holds an open file")
