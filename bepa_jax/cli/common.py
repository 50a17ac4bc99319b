"""What every `bepa-*` command shares: logging set-up, one-line errors and exit codes.

A user of a CLI never sees a Python traceback for a problem they can fix: errors caused by
input (`BepaError`, and the ValueError/OSError that file and flag handling raise) print
`PROG: error: <first line>` to stderr and exit 2; Ctrl-C exits 130. Bugs still raise.

On a host without a TPU, a command keeps JAX from probing libtpu (installed for bepa-compile),
which otherwise prints six lines of TPU warnings and errors before falling back to the CPU.
"""
from __future__ import annotations

import glob
import importlib.util
import logging
import os
import sys
from typing import Callable, Mapping

from bepa_jax.errors import BepaError, one_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
NOISY_LOGGERS = ("absl", "jax._src", "orbax")
TPU_DEVICES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*")  # TPU VMs (v4 and older / v5e and newer)
# JAX's GPU plugins and the device node each needs: listed only where both are present
GPU_PLATFORMS = (("cuda", ("jax_cuda12_plugin", "jax_cuda13_plugin"), "/dev/nvidia[0-9]*"),
                 ("rocm", ("jax_rocm60_plugin", "jax_rocm7_plugin"), "/dev/kfd"))


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


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def platforms_without_tpu(env: Mapping[str, str] | None = None) -> str | None:
  """The JAX_PLATFORMS a command sets for itself, or None to leave JAX's choice alone.

  None when JAX_PLATFORMS is set, on a TPU host (/dev/accel*, /dev/vfio/N), or without
  libtpu (nothing to keep quiet); else the GPU platforms whose plugin and device are both
  there (an explicit platform that fails to start is an error), then cpu."""
  env = os.environ if env is None else env
  if env.get("JAX_PLATFORMS", "").strip() or any(glob.glob(p) for p in TPU_DEVICES):
    return None
  if not _importable("libtpu"):
    return None
  gpus = [name for name, modules, device in GPU_PLATFORMS
          if any(_importable(m) for m in modules) and glob.glob(device)]
  return ",".join(gpus + ["cpu"])


def keep_jax_off_tpu() -> str | None:
  """Sets JAX_PLATFORMS (platforms_without_tpu) for this process and its children, and for
  an already imported jax (which read the variable at import); before any backend starts."""
  platforms = platforms_without_tpu()
  if platforms:
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:
      sys.modules["jax"].config.update("jax_platforms", platforms)
  return platforms


def entry(main: Callable[..., int]) -> Callable[[], None]:
  """A console-script entry point: `run = cli.entry(main)`. bepa-compile has its own (it
  loads libtpu on purpose, to compile for TPU topologies)."""
  def run() -> None:
    keep_jax_off_tpu()
    sys.exit(main())
  run.__doc__ = f"Console-script entry point of {main.__module__}."
  return run
