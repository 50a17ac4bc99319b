"""The loop's batches: built ahead (data/feeder.py: data.workers processes, or this process),
and put on the devices a step before use (data.prefetch >= 1), so the host's work for step
s + 1 overlaps step s on the devices.

The loop calls `take(step)` for the batch it runs and `ahead()` once the step is dispatched.
A failure while building ahead is raised by the `take` that needs the batch, so a step that
ends in a preemption save still saves. A process's batch is a pure function of (step, process
index, process count) -- packed rows included, agreed from the global plan without a
collective -- so a worker builds it whole.
"""
from __future__ import annotations

import jax

from bepa_jax.data import feeder as feeder_lib


class DeviceFeed:
  """take(step) -> (this process's batch, the global batch on the devices)."""

  def __init__(self, host: feeder_lib.Feeder, put, *, pipeline=None, ahead: bool = True):
    self.host, self.put, self.pipeline = host, put, pipeline
    self.lookahead = bool(ahead)
    self._ready, self._error = None, None

  def _load(self):
    step, local, info = next(self.host)
    self._ready = (step, local, info, self.put(local))

  def take(self, step: int):
    if self._error is not None:
      raise self._error
    if self._ready is None:
      self._load()
    ready, self._ready = self._ready, None
    got, local, info, batch = ready
    if got != step:
      raise RuntimeError(f"the batch of step {got} was ready for step {step}")
    if info is not None and self.pipeline is not None:
      feeder_lib.add_tally(self.pipeline, info["tally"])
    return local, batch

  def ahead(self) -> None:
    """Builds (or fetches) the next step's batch and puts it on the devices; call it once the
    running step is dispatched."""
    if not self.lookahead or self._ready is not None or self._error is not None:
      return
    try:
      self._load()
    except StopIteration:
      pass
    except feeder_lib.DataWorkerError as e:
      self._error = e

  def close(self) -> None:
    self.host.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_feed(job, first: int, last: int, global_batch) -> DeviceFeed:
  """The batches of steps first .. last-1 of `job` (trainer/build.Job), as data.workers and
  data.prefetch say. `global_batch(local, mesh)` puts a batch on the devices (trainer/loop.py's)."""
  d, pipeline, mesh = job.config.data, job.pipeline, job.mesh
  pid, pcount = jax.process_index(), jax.process_count()
  recipe = None
  if d.workers:
    recipe = feeder_lib.Recipe(job.config, job.tokenizer, pipeline.packer.batch_shards,
                               pipeline.start_step, pid, pcount)
  host = feeder_lib.Feeder(lambda step: pipeline.batch(step, pid, pcount), first, last,
                           workers=d.workers, prefetch=d.prefetch, recipe=recipe)
  return DeviceFeed(host, lambda local: global_batch(local, mesh), pipeline=pipeline,
                    ahead=d.prefetch > 0)
