"""The next steps' batches, built ahead of use in worker processes (grain), in step order.

A batch is a pure function of the step (pair_pipeline.py), so any process can build any step:
`Feeder` runs `grain.MapDataset.range(first, last).map(...).mp_prefetch(...)`, whose worker j of
W builds steps first + j, first + j + W, ... on one core each, and hands them back in order
through shared memory. A worker is not sent the run's pipeline (its sources may hold open files
and large indexes): it rebuilds it from a `Recipe` -- the typed config, the tokenizer (which
pickles as its model), the batch shards and where the stream starts -- by the factory call the
training process made, so its batches are bitwise those the training process would build.
What a worker counts (duplicates replaced, truncations, lines a lazy reader dropped) comes back
with each batch, to be added to the training process's pipeline when the batch is used.

Workers ignore SIGTERM, SIGINT and SIGHUP (a launcher signals the whole process group): the
training process decides when they stop -- after a preemption save -- and they exit by
themselves if it dies. A worker that dies or raises stops the run with one line naming it.
With data.workers=0 the batches are built in the calling process, as before, and grain is not
imported.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from typing import Any, Callable

import numpy as np

from bepa_jax.data import factory
from bepa_jax.data.records import LoadStats
from bepa_jax.errors import BepaError, one_line

log = logging.getLogger("bepa")


class DataWorkerError(BepaError):
  """A data worker died or failed: the message names the worker and the step."""


def build_rows(pipeline, step: int, process_index: int, process_count: int) -> dict:
  """A worker's batch: this process's rows at `step` (packed rows agreed from the global plan,
  so the same as the training process would build)."""
  return pipeline.batch(step, process_index, process_count)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What a worker rebuilds the run's pipeline from: picklable parts only."""
  specs: Any                  # config.specs.Specs of the run
  tokenizer: Any              # data.tokenizer.Tokenizer (pickles as its model)
  batch_shards: int           # mesh data x fsdp: the packing groups
  start_step: int = 0         # the step at which the data stream starts (pipeline.start_step)
  process_index: int = 0
  process_count: int = 1
  make: Callable = build_rows  # (pipeline, step, pid, pcount) -> dict; a module-level function

  def pipeline(self):
    opened = factory.open_configured_sources(self.specs.data)
    pipe = factory.build_pipeline(self.specs, self.tokenizer, self.batch_shards, opened=opened)
    pipe.start_step = self.start_step
    return pipe


def tally(pipe) -> collections.Counter:
  """What `pipe` counted so far: its counters, and the lines its lazy readers dropped."""
  out = collections.Counter({f"count.{k}": v for k, v in pipe.counters.items()})
  for c in pipe.components:
    if c.stats is not None:
      out.update({f"load.{k}": v for k, v in dataclasses.asdict(c.stats).items()})
  return out


def add_tally(pipe, delta: dict) -> None:
  """Adds what a worker counted for a batch to the training process's pipeline."""
  pipe.counters.update({k[6:]: v for k, v in delta.items() if k.startswith("count.") and v})
  loads = {k[5:]: v for k, v in delta.items() if k.startswith("load.")}
  if any(loads.values()):
    pipe.load_stats.add(LoadStats(**loads))


class _Build:
  """grain's map function: the batch of a step, built in a worker by its own pipeline."""

  def __init__(self, recipe: Recipe):
    self.recipe, self._pipe = recipe, None

  def __getstate__(self):
    return {"recipe": self.recipe, "_pipe": None}

  def __call__(self, step):
    r, step = self.recipe, int(step)
    if self._pipe is None:
      r.tokenizer.threads = 1  # one core per worker: W workers use W cores
      self._pipe = r.pipeline()
    before = tally(self._pipe)
    t0 = time.process_time()
    local = r.make(self._pipe, step, r.process_index, r.process_count)
    cpu = time.process_time() - t0
    delta = tally(self._pipe)
    delta.subtract(before)
    return {"batch": local, "step": step, "pid": os.getpid(), "cpu_s": cpu,
            "tally": {k: v for k, v in delta.items() if v}}


def _worker_init(pid_dir: str, index: int, count: int) -> None:
  """In each worker, before its first batch: its pid noted (to name it if it dies), signals
  left to the training process, one thread for the tokenizers, no log lines (errors come back
  as exceptions), exit with the parent."""
  with open(os.path.join(pid_dir, str(index)), "w") as f:
    f.write(str(os.getpid()))
  for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
  os.environ["RAYON_NUM_THREADS"] = "1"        # HF tokenizers
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  logger = logging.getLogger("bepa")
  logger.handlers, logger.propagate = [logging.NullHandler()], False
  threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()


def _exit_with(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(1.0)
  os._exit(1)


def _take(array) -> np.ndarray:
  """A copy of a batch array out of grain's shared memory, whose block is unlinked now (left
  to grain, the last blocks of a run would still be queued for deletion at exit)."""
  out = np.array(array)
  shm = getattr(array, "shm", None)
  if shm is not None and getattr(array, "_unlink_on_del", False):
    array._unlink_on_del = False
    shm.unlink()
  return out


def _quiet_resource_tracker() -> None:
  """Shared-memory blocks that a killed worker leaves behind are unlinked at exit by
  multiprocessing's resource tracker, which would print a warning per kind: start it (if not
  running yet) with its stderr on /dev/null, so that a failed run ends in its one line."""
  from multiprocessing import resource_tracker
  if getattr(resource_tracker._resource_tracker, "_fd", None) is not None:
    return
  saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(null, 2)
    resource_tracker.ensure_running()
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


def _mark_flags_parsed() -> None:
  """grain reads absl flags; the bepa-* commands parse their own arguments."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class Feeder:
  """(step, local batch, info) for steps first .. last-1, in order.

  workers=0: `make_local_batch(step)` here, when asked (info None). workers=W: W grain worker
  processes build `prefetch` steps ahead from `recipe`; info holds the worker, its CPU seconds
  for the batch and what it counted (`add_tally`)."""

  def __init__(self, make_local_batch: Callable[[int], dict] | None, first: int, last: int, *,
               workers: int = 0, prefetch: int = 2, recipe: Recipe | None = None):
    self.make, self.first, self.last = make_local_batch, int(first), int(last)
    self.workers, self.prefetch, self.recipe = int(workers), int(prefetch), recipe
    if self.workers and recipe is None:
      raise TypeError("Feeder: workers need a Recipe")
    self._next, self._it, self._pid_dir = self.first, None, None
    cores = len(os.sched_getaffinity(0))
    if self.workers > cores:
      log.warning("data.workers=%d exceeds the %d cores this process may use: workers share "
                  "cores (docs/data.md: sizing workers)", self.workers, cores)

  def __iter__(self):
    return self

  def _open(self):
    import grain
    _mark_flags_parsed()
    _quiet_resource_tracker()
    self._pid_dir = tempfile.mkdtemp(prefix="bepa-data-workers-")
    per_worker = max(1, math.ceil(self.prefetch / self.workers))
    ds = grain.MapDataset.range(self.first, self.last).map(_Build(self.recipe))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                     per_worker_buffer_size=per_worker),
                        worker_init_fn=functools.partial(_worker_init, self._pid_dir))
    log.info("data.workers=%d: batches built in %d worker processes (grain), up to %d steps "
             "ahead", self.workers, self.workers, per_worker * self.workers)
    return iter(ds)

  def __next__(self):
    step = self._next
    if step >= self.last:
      raise StopIteration
    self._next += 1
    if not self.workers:
      return step, self.make(step), None
    if self._it is None:
      self._it = self._open()
    try:
      out = next(self._it)
    except StopIteration:
      raise DataWorkerError(f"the data workers ended before step {step}") from None
    except Exception as e:  # noqa: BLE001  (a worker's error, raised again here by grain)
      raise self._failure(step, e) from None
    if int(out["step"]) != step:
      raise RuntimeError(f"data workers returned step {int(out['step'])} for step {step}")
    k = (step - self.first) % self.workers
    local = {key: _take(v) for key, v in out["batch"].items()}
    return step, local, {"worker": k, "cpu_s": float(out["cpu_s"]), "tally": out["tally"]}

  def _failure(self, step: int, e: Exception) -> DataWorkerError:
    """One line naming the worker of `step` (worker j builds steps first + j + i W)."""
    log.debug("data worker error at step %d", step, exc_info=e)
    k = (step - self.first) % self.workers
    who = f"data worker {k + 1} of {self.workers}"
    try:
      with open(os.path.join(self._pid_dir, str(k))) as f:
        who += f" (pid {int(f.read())})"
    except (OSError, ValueError):
      pass  # it died before it started
    died = re.search(r"terminated unexpectedly with exit code (-?\d+)", str(e))
    if died:  # batches it had built but not handed over are lost with it
      code = int(died.group(1))
      name = f", {signal.Signals(-code).name}" if -code in signal.valid_signals() else ""
      what = f"died (exit code {code}{name}) before handing over the batch of step {step}"
    else:
      what = "failed building the batch of step %d: %s" % (step, one_line(e) if isinstance(
          e, BepaError) else f"{type(e).__name__}: {one_line(e)}")
    return DataWorkerError(f"{who} {what}; the run stops (rerun it to resume from its last "
                           f"checkpoint)")

  def close(self) -> None:
    """Stops the workers (batches built ahead are dropped)."""
    it, self._it = self._it, None
    if it is not None:
      try:
        it.close()
      except Exception as e:  # noqa: BLE001  (workers that never started: nothing to stop)
        log.debug("closing the data workers: %s", one_line(e))
      del it
      gc.collect()  # grain's iterators released while their modules are still loaded
    if self._pid_dir is not None:
      shutil.rmtree(self._pid_dir, ignore_errors=True)
      self._pid_dir = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
