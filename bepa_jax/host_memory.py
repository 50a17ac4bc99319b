"""Host allocator settings for XLA:CPU: keep freed memory instead of handing it back to the OS.

Why: XLA:CPU allocates each step's temporaries (825 MiB for the small bench config) with
malloc and frees them at the end of the step. glibc serves allocations that large with a fresh
mmap, so every step page-faults its whole working set back in: 247k minor faults and 0.45 s of
kernel CPU time per step on the small config. Telling glibc to serve big blocks from the heap,
keep it (no trim) and use one arena makes every step after the first reuse the same pages:
the small config's step goes from 1084 ms to 855 ms, with zero page faults
(bench/host_malloc.py). PyTorch gains the same way (bench/step.py runs it both ways).

It must run before XLA starts its thread pools (before the first JAX computation or
`jax.devices()`): a thread keeps the malloc arena it first used. `bepa-train` calls
`configure(config.train.host_malloc)` first thing. The cost is that freed host memory stays
in the process (its peak RSS does not grow) and one arena serialises malloc across threads;
so "auto" applies it only where the CPU is the accelerator (no TPU or GPU plugin installed).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import os
import sys

from bepa_jax.errors import ConfigError

log = logging.getLogger("bepa")

MODES = ("auto", "retain", "system")

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")

_applied = False


def cpu_is_the_accelerator() -> bool:
  """True when JAX will run on the host CPU: JAX_PLATFORMS=cpu, or no TPU/GPU plugin installed.

  Decided without initialising a JAX backend (which would start the thread pools too early).
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  return not any(importlib.util.find_spec(m) is not None for m in _ACCELERATOR_MODULES)


def _glibc():
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # noqa: B018  (absent on musl: not glibc, leave it alone)
    return libc
  except (OSError, AttributeError):
    return None


def applied() -> bool:
  """Whether `configure` retuned glibc in this process."""
  return _applied


def configure(mode: str = "auto") -> bool:
  """Applies `mode` ("auto" | "retain" | "system"); returns whether glibc was retuned.

  retain: large blocks from the heap (no mmap), no trimming, one arena. system: glibc's
  defaults. auto: retain when `cpu_is_the_accelerator()`. Idempotent.
  """
  global _applied
  if mode not in MODES:
    raise ConfigError(f"train.host_malloc={mode!r} must be one of {', '.join(MODES)}")
  if mode == "system" or (mode == "auto" and not cpu_is_the_accelerator()):
    return False
  if _applied:
    return True
  libc = _glibc()
  if libc is None:
    log.info("host_malloc=%s: not glibc, allocator left as it is", mode)
    return False
  ok = all(libc.mallopt(p, v) == 1 for p, v in ((_M_MMAP_MAX, 0),
                                                 (_M_TRIM_THRESHOLD, 2**31 - 1),
                                                 (_M_ARENA_MAX, 1)))
  _applied = ok
  return ok
