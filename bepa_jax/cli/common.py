"""What every `bepa-*` command shares: logging set-up, one-line errors and exit codes.

A user of a CLI never sees a Python traceback for a problem they can fix: errors caused by
input (`BepaError`, and the ValueError/OSError that file and flag handling raise) print
`PROG: error: <first line>` to stderr and exit 2; Ctrl-C exits 130. Bugs still raise.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from bepa_jax.errors import BepaError, one_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
NOISY_LOGGERS = ("absl", "jax._src", "orbax")


def setup_logging(verbose: bool = True) -> None:
  """INFO lines with a time stamp (WARNING only when not `verbose`, e.g. on processes > 0)."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  for noisy in NOISY_LOGGERS:
    logging.getLogger(noisy).setLevel(logging.WARNING)
  if not verbose:
    logging.getLogger("bepa").setLevel(logging.WARNING)


def absolute(path: str) -> str:
  """A path the user gave, made absolute once (relative to the current directory), so that
  Orbax (which refuses relative paths) and every later step see the same place; gs://... as is."""
  return path if "://" in path else os.path.abspath(path)


def fail(prog: str, message) -> int:
  """Prints `prog: error: message` (its first line) and returns the usage exit code."""
  text = one_line(message) if isinstance(message, BaseException) else str(message)
  print(f"{prog}: error: {text}", file=sys.stderr)
  return EXIT_USAGE


def guarded(prog: str, body: Callable[[], object],
            errors: tuple = (BepaError, ValueError, OSError)) -> int:
  """Runs `body`; a user-fixable error becomes one line and exit 2, Ctrl-C exit 130.

  An int returned by `body` is the exit code; any other result (None, a train state) is 0.
  """
  try:
    code = body()
  except errors as e:
    return fail(prog, e)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED
  return code if isinstance(code, int) and not isinstance(code, bool) else EXIT_OK


def entry(main: Callable[..., int]) -> Callable[[], None]:
  """A console-script entry point: `run = cli.entry(main)`."""
  def run() -> None:
    sys.exit(main())
  run.__doc__ = f"Console-script entry point of {main.__module__}."
  return run
