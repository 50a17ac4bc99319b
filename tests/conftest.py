"""Tests run on 8 simulated CPU devices: XLA_FLAGS must be set before jax is imported.

One persistent XLA compilation cache is shared by every worker and every subprocess of a test
run (most of the suite's time is compiling the same small steps again: each `build` makes a new
jitted closure, so only an HLO-keyed cache is hit across tests). It lives in a fresh directory
per run and is removed at the end; `BEPA_TEST_XLA_CACHE=DIR` keeps one across runs (entries are
keyed by the program, flags and jax version, so a stale entry is never used).
"""
import os
import shutil
import sys
import tempfile
import uuid

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")

_RUN_DIR = None  # the run's shared directory, made by the controller (xdist) or the only process


def pytest_configure(config):
  """Before any test module imports jax: point this process -- and, through the environment,
  the xdist workers and every subprocess -- at the run's compilation cache."""
  global _RUN_DIR
  if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return  # a worker (inherits the controller's environment) or a cache chosen by the caller
  cache = os.environ.get("BEPA_TEST_XLA_CACHE")
  if not cache:
    _RUN_DIR = os.path.join(tempfile.gettempdir(), f"bepa-tests-{os.getuid()}", uuid.uuid4().hex)
    cache = os.path.join(_RUN_DIR, "xla")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
  if _RUN_DIR:
    shutil.rmtree(_RUN_DIR, ignore_errors=True)
