"""Orbax's console noise, kept off the console: every failure it reports still reaches the user,
once, as one line from the checkpoint store (checkpoint/store.py) or the reader (reader.py).

Orbax and TensorStore report a damaged checkpoint or a failed background write with a traceback
per file (absl, asyncio), then echo it from coroutines and callbacks collected later
(sys.unraisablehook). Each helper here silences one of those channels, for as long as needed.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import sys


@contextlib.contextmanager
def hushed(name: str = "absl", level: int = logging.ERROR):
  """Logger `name` at `level` inside the block (Orbax's warnings that are not news: a handler
  overridden on purpose, a read-only manager opened read-only)."""
  logger = logging.getLogger(name)
  previous = logger.level
  logger.setLevel(level)
  try:
    yield
  finally:
    logger.setLevel(previous)


def _drop_failed_read_echoes() -> None:
  """After a damaged checkpoint's read failed (reported once, by the caller), its read
  coroutines that are collected unfinished, which can be long after the restore returned,
  reach sys.unraisablehook ("Exception ignored in" with a traceback on stderr): those are
  dropped for the rest of the process; other unraisable exceptions still print."""
  previous = sys.unraisablehook
  if getattr(previous, "_bepa_failed_reads", False):
    return

  def hook(unraisable):
    if "while reading array index" in str(unraisable.exc_value):
      return
    previous(unraisable)

  hook._bepa_failed_reads = True
  sys.unraisablehook = hook


@contextlib.contextmanager
def quiet_reads():
  """Silences the loggers that print a traceback per file of a damaged checkpoint while Orbax
  tries it (asyncio, absl): its failure is reported once, by the caller. After a failure, the
  failed read's late echoes are dropped too (`_drop_failed_read_echoes`)."""
  loggers = [logging.getLogger(n) for n in ("asyncio", "absl")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.CRITICAL)
  try:
    yield
  except BaseException:
    _drop_failed_read_echoes()
    raise
  finally:
    gc.collect()
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


class BackgroundErrors(logging.Filter):
  """While this process writes checkpoints: Orbax's writer threads log each failure with a
  traceback per file, and TensorStore's callbacks print 'Event loop is closed' tracebacks
  after it. Both are kept off the console; the first message is kept in `first`, and the
  store's `poll` stops training with one line (so nothing Orbax reports is lost)."""

  def __init__(self):
    super().__init__()
    self.first: str | None = None
    self._hook = None

  def filter(self, record) -> bool:
    if "orbax" in record.pathname and record.levelno >= logging.ERROR:
      if self.first is None:
        self.first = record.getMessage()
      return False
    return True

  def _unraisable(self, unraisable) -> None:
    if isinstance(unraisable.exc_value, RuntimeError) and \
        "Event loop is closed" in str(unraisable.exc_value):
      return
    self._hook(unraisable)

  def install(self) -> None:
    logging.getLogger("absl").addFilter(self)
    self._hook, sys.unraisablehook = sys.unraisablehook, self._unraisable

  def remove(self) -> None:
    logging.getLogger("absl").removeFilter(self)
    if self._hook is not None and sys.unraisablehook == self._unraisable:
      sys.unraisablehook = self._hook
