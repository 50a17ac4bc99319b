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


# `--dist loadfile` (pytest.ini): each test file runs on one xdist worker, so its module fixtures
# (a trained workdir, a sweep, a multi-process launch) are built once. Files are handed out in
# collection order, so the longest go first (CPU seconds measured on a 2-core machine) and no
# long file starts last.
LONGEST_FIRST = (
  "test_packing", "test_checkpoint", "test_objective_inputs", "test_hf_import", "test_sweep",
  "test_step", "test_gradcache", "test_multihost", "test_bench_authors_step", "test_st_export",
  "test_bench_packing", "test_bad_inputs", "test_faults", "test_bad_inputs_2",
  "test_objective_variants", "test_transfer", "test_hf_init", "test_perf_options", "test_aot",
  "test_aot_search",
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: file order kept
