"""The training loop of `bepa-train`: build, then step, log, evaluate and save until done."""
from __future__ import annotations

import contextlib
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections

from bepa_jax.checkpoint import store as ckpt_lib
from bepa_jax.data import factory as data_factory
from bepa_jax.errors import ConfigError
from bepa_jax import host_memory
from bepa_jax import mesh as mesh_lib
from bepa_jax import profiling
from bepa_jax.training import throughput
from bepa_jax.eval import periodic as periodic_eval
from bepa_jax.metric_writer import MetricWriter
from bepa_jax.trainer.build import Job, build, check_config
from bepa_jax.trainer import feed
from bepa_jax.trainer.guard import Guard
from bepa_jax.workdir_lock import WorkdirLock

log = logging.getLogger("bepa")


def global_batch(local: dict, mesh) -> dict:
  """Per-process rows -> global arrays sharded over the batch axes (no host gathers)."""
  sharding = mesh_lib.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


# ----------------------------------------------------------------------------- loop
class StepLog:
  """The metrics of the steps since the last log: summed on device (no host sync per step),
  averaged, timed (compilation excluded) and written at log steps; throughput and ETA."""

  def __init__(self, writer: MetricWriter, meter: throughput.TokenMeter, guard: Guard,
               steps: int, first: int, every: int):
    self.writer, self.meter, self.guard, self.steps, self.first = writer, meter, guard, steps, first
    self.every = max(every, 1)
    self.window, self.window_steps = None, 0
    self.t_start, self.step_start, self.since_start = None, 0, throughput.TokenCounts()
    self.metrics: dict = {}

  def add(self, done: int, step_metrics) -> None:
    self.window = (step_metrics if self.window is None
                   else jax.tree.map(jnp.add, self.window, step_metrics))
    self.window_steps += 1
    if done % self.every == 0 or done == self.steps or done == self.first + 1:
      self._log(done, step_metrics)

  def _log(self, done: int, step_metrics) -> None:
    metrics = {k: float(v) / self.window_steps for k, v in jax.device_get(self.window).items()}
    if "learning_rate" in step_metrics:  # the current value, not the window's mean
      metrics["learning_rate"] = float(step_metrics["learning_rate"])
    self.window, self.window_steps = None, 0
    window_tokens = self.meter.take()  # global: summed over processes (3 ints, log steps only)
    metrics["padding_fraction"] = window_tokens.padding_fraction
    self.guard.check(metrics, done)
    now = time.perf_counter()
    if self.t_start is None:  # the first step includes compilation: start the clock after it
      self.t_start, self.step_start = now, done
      rate = float("nan")
    else:
      self.since_start = self.since_start + window_tokens
      rate = (done - self.step_start) / (now - self.t_start)
    if rate == rate:  # not NaN: throughput is known from the second log on
      metrics["steps_per_sec"] = rate
      metrics["real_tokens_per_sec"] = self.since_start.real / (now - self.t_start)
      metrics["processed_tokens_per_sec"] = self.since_start.processed / (now - self.t_start)
    self.writer.write(done, metrics)
    eta = format_eta((self.steps - done) / rate) if rate == rate and rate > 0 else "?"
    log.info("step %d/%d | loss %.4f | mlm %.4f acc %.3f | con %.4f | x->y %.3f y->x %.3f "
             "| cos+ %.3f cos- %.3f | %.0f real tok/s, %.0f%% pad | ETA %s",
             done, self.steps, metrics["loss"], metrics["mlm_loss"], metrics["mlm_accuracy"],
             metrics["contrastive_loss"], metrics["acc_x2y"], metrics["acc_y2x"],
             metrics["pos_cos"], metrics["neg_cos"], metrics.get("real_tokens_per_sec", 0.0),
             100 * metrics["padding_fraction"], eta)
    self.metrics = metrics

  def pause(self, seconds: float) -> None:
    """Keeps `seconds` (an evaluation) out of the throughput figures."""
    if self.t_start is not None:
      self.t_start += seconds


def train(config: ml_collections.ConfigDict, workdir: str):
  """Runs the whole job; returns (final state, last logged metrics).

  Phases: validate (once) -> lock the workdir -> compare with its checkpoints ->
  build -> loop -> summary. Nothing is written or removed before the lock is held."""
  specs = check_config(config, jax.device_count())  # the ConfigDict is not read after this
  # the sources opened and checked before anything is written (the lock, checkpoints/, a tokenizer)
  opened = data_factory.open_configured_sources(specs.data)
  # Held before the checkpointer opens: opening drops incomplete saves, which on a busy
  # workdir would be the other run's save in progress.
  lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    ckpt = ckpt_lib.Checkpointer(workdir, specs.checkpoint)
    ckpt.check_config(specs.to_dict())  # before anything is built or config.json is rewritten
    guard = Guard(ckpt, handle_preemption=True)  # SIGTERM: save at the end of the step, stop
    saved = ckpt.steps()
    if saved and specs.train.steps:  # before anything is built or config.json is rewritten
      check_steps(specs.train.steps, saved[-1], ckpt.directory)
    job = build(specs, workdir, ckpt=ckpt, opened=opened)
    if host_memory.applied():  # set by main() before XLA started; logged once the job is valid
      log.info("train.host_malloc=%s: glibc keeps freed host memory (no per-step page faults)",
               specs.train.host_malloc)
    if specs.train.steps == 0:
      return save_initial_state(job, ckpt, workdir), {}
    first = int(jax.device_get(job.state.step))
    check_steps(specs.train.steps, first, ckpt.directory)  # the step restored, if not the last
    state, metrics = run_steps(job, ckpt, guard, workdir, first)
    summarize(job, ckpt, workdir, first, int(jax.device_get(state.step)))
    return state, metrics


def check_steps(steps: int, restored: int, directory) -> None:
  """A run whose train.steps lies below its restored step would train nothing: say so."""
  if steps < restored:
    raise ConfigError(f"train.steps={steps} is below the restored step {restored} (checkpoints "
                      f"in {directory}): nothing to train; raise train.steps or use a new "
                      f"--workdir")


def run_steps(job: Job, ckpt, guard: Guard, workdir: str, first: int):
  """Steps `first` .. train.steps: batch, step, log, evaluate, save; stops early on SIGTERM."""
  config, mesh, pipeline, state, step_fn = job.config, job.mesh, job.pipeline, job.state, job.step_fn
  steps = int(config.train.steps)
  evaluator = periodic_eval.from_config(config, job.model, job.tokenizer, mesh)  # None: eval off
  profiler = profiling.StepProfiler(config.train, workdir)
  writer = MetricWriter(workdir, resume_step=first)
  tokens = throughput.TokenMeter(config.loss)  # real / processed tokens, counted on the host
  steplog = StepLog(writer, tokens, guard, steps, first, int(config.train.log_every))
  # the batches: built ahead (data.workers) and on the devices a step early (data.prefetch)
  with jax.set_mesh(mesh), feed.open_feed(job, first, steps, global_batch) as batches:
    for step in range(first, steps):
      profiler.before(step)
      local, batch = batches.take(step)
      tokens.add(local)
      state, step_metrics = step_fn(state, batch)
      batches.ahead()  # the next step's batch, while this one runs
      done = step + 1
      profiler.after(done, step_metrics)
      steplog.add(done, step_metrics)
      eval_metrics = None
      if evaluator is not None and evaluator.due(done, steps):
        t_eval = time.perf_counter()
        eval_metrics = evaluator(state.params)
        writer.write(done, eval_metrics, prefix="eval")
        log.info("eval step %d | %s", done, periodic_eval.headline(eval_metrics))
        steplog.pause(time.perf_counter() - t_eval)
      if guard.step_end(done, steps, state, step_metrics, config=config, pipeline=pipeline,
                        mesh=mesh, extra_metrics={f"eval/{k}": v for k, v in eval_metrics.items()}
                        if eval_metrics is not None else None):
        break  # preempted: the state at `done` is saved
  profiler.stop(state)  # a run that ends (or is preempted) inside the profiled range
  ckpt.wait()
  ckpt.close()
  writer.close()
  log.info("%s", pipeline.report())  # what the input dropped, redrew or truncated: never silent
  return state, steplog.metrics


def summarize(job: Job, ckpt, workdir: str, first: int, last: int) -> None:
  """The run's last lines: what it wrote, where, and the next commands."""
  saved = ckpt.steps()
  log.info("done: steps %d -> %d of %d; checkpoints %s in %s; metrics in %s; tokenizer and "
           "config.json in %s", first, last, int(job.config.train.steps),
           ",".join(map(str, saved[-3:])) or "none", ckpt.directory,
           os.path.join(workdir, "metrics.jsonl"), workdir)
  log.info("next: bepa-eval --workdir %s --parallel TEXT.x TEXT.y (or --tatoeba DIR)   "
           "(cross-lingual retrieval, [CLS] diagnostics); bepa-export --workdir %s --out DIR   "
           "(transformers / sentence-transformers); rerun this command to resume or extend "
           "(--config.train.steps=N)", workdir, workdir)


def save_initial_state(job: Job, ckpt: ckpt_lib.Checkpointer, workdir: str):
  """train.steps=0: the state as built (from init.hf_dir, fresh optimizer) becomes checkpoint 0,
  so that an imported model can be exported, evaluated or trained later without a step."""
  steps = ckpt.steps()
  if steps:
    log.info("train.steps=0: %s already holds checkpoint(s) up to step %d: nothing written",
             ckpt.directory, steps[-1])
  else:
    ckpt.save(0, job.state, config=job.config.to_dict(), data=dict(job.pipeline.state_dict(0)),
              metrics={}, mesh=job.mesh)
    ckpt.wait()
    source = job.config.init.hf_dir or "a fresh initialisation"
    log.info("train.steps=0: wrote checkpoint 0 (weights from %s, fresh optimizer state) to %s "
             "and the run's config to %s; next: bepa-export --workdir %s --out DIR, or bepa-train "
             "with the same config and --config.train.steps=N to train from it", source,
             ckpt.directory, os.path.join(workdir, "config.json"), workdir)
  ckpt.close()
  return job.state
