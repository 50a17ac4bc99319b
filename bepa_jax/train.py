"""`bepa-train`: the training loop, in phases (config -> mesh -> data -> state -> step -> loop).

  bepa-train --config configs/quickstart.py --config.train.steps=200 --workdir DIR
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bepa_jax import cli
from bepa_jax.checkpoint import manager as ckpt_lib
from bepa_jax import config as config_lib
from bepa_jax.objective import heads as heads_lib
from bepa_jax.hf import init as hf_init
from bepa_jax import distributed
from bepa_jax import host_memory
from bepa_jax import mesh as mesh_lib
from bepa_jax import profiling
from bepa_jax import step as step_lib
from bepa_jax import throughput
from bepa_jax import train_state
from bepa_jax.data import factory as data_factory
from bepa_jax.data import pipeline as pipeline_lib
from bepa_jax.data import tokenizer as tokenizer_lib
from bepa_jax.errors import BepaError, ConfigError
from bepa_jax.eval import periodic as periodic_eval
from bepa_jax.metric_writer import MetricWriter
from bepa_jax.model import BepaEncoder, EncoderConfig

log = logging.getLogger("bepa")


# ----------------------------------------------------------------------------- phases
def example_inputs(config) -> dict:
  L, P = int(config.data.max_length), int(config.data.max_predictions_per_seq)
  return dict(input_ids=np.zeros((2, L), np.int32), token_type_ids=np.zeros((2, L), np.int32),
              attention_mask=np.ones((2, L), np.int32), mlm_positions=np.zeros((2, P), np.int32))


def global_batch(local: dict, mesh) -> dict:
  """Per-process rows -> global arrays sharded over the batch axes (no host gathers)."""
  sharding = mesh_lib.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def local_batch(pipeline, step: int, pid: int, pcount: int) -> dict:
  """This process's rows at `step`. Packed: a step that does not fit the packed rows on some
  process is packed into the fallback rows on every process (the global shape must agree)."""
  local = pipeline.batch(step, pid, pcount)
  if pcount > 1 and getattr(pipeline, "packing", False):
    from jax.experimental import multihost_utils
    rows = (local["input_ids"].shape[1],
            local["mlm_input_ids"].shape[1] if "mlm_segment_ids" in local else 0)
    agreed = tuple(int(r) for r in np.max(multihost_utils.process_allgather(np.array(rows)), 0))
    if agreed != rows:
      local = pipeline.batch(step, pid, pcount, rows=agreed)
  return local


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


# ----------------------------------------------------------------------------- build
@dataclasses.dataclass
class Job:
  """Everything a run needs, built from the config before the first step."""
  config: ml_collections.ConfigDict
  mesh: Any
  tokenizer: tokenizer_lib.Tokenizer
  pipeline: pipeline_lib.Pipeline
  model_cfg: EncoderConfig
  model: BepaEncoder
  state: train_state.TrainState
  shardings: Any
  step_fn: Any


@dataclasses.dataclass
class ModelParts:
  """The model, its optimizer and schedule, and the arguments of train_state's state builders."""
  model: BepaEncoder
  schedule: Any
  tx: Any
  init_args: tuple
  init_kwargs: dict


def model_parts(config: ml_collections.ConfigDict, model_cfg: EncoderConfig, mesh) -> ModelParts:
  """What `build` and bepa-compile (bepa_jax/aot.py) share: one definition of the state."""
  model = BepaEncoder(model_cfg)
  steps = int(config.train.steps)
  schedule = train_state.learning_rate_schedule(config.optim, steps)
  tx = train_state.create_optimizer(config.optim, steps)
  init_args = (model, tx, example_inputs(config), jax.random.key(int(config.train.seed)), mesh,
               config.mesh)
  init_kwargs = dict(head=heads_lib.from_config(config.loss, model_cfg.hidden_size),
                     ema=heads_lib.uses_ema(config.loss))
  return ModelParts(model, schedule, tx, init_args, init_kwargs)


def build(config: ml_collections.ConfigDict, workdir: str, devices=None, ckpt=None) -> Job:
  """Config -> mesh -> tokenizer and data -> model and sharded state -> jitted step.

  With a checkpoint.Checkpointer, the state is restored from its latest readable checkpoint
  (straight into this mesh's shardings) instead of initialised, when there is one.
  """
  devices = list(jax.devices() if devices is None else devices)
  if config.init.hf_dir:  # the model's shape comes from the pretrained checkpoint
    hf_init.apply_to_config(config)
  shape = config_lib.validate(config, len(devices))
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  log.info("mesh %s on %d devices (%d processes)", dict(zip(mesh_lib.AXES, shape)),
           len(devices), jax.process_count())
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  tokenizer = data_factory.load_tokenizer(config, workdir)
  pipeline = data_factory.build_pipeline(config, tokenizer, shape[0] * shape[1])
  if pipeline.truncated:
    log.info("%d sentences are longer than data.max_length=%d and are truncated",
             pipeline.truncated, config.data.max_length)
  model_cfg = EncoderConfig.from_config(config.model, vocab_size=tokenizer.vocab_size)
  if model_cfg.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                      f"{tokenizer.vocab_size} pieces")
  parts = model_parts(config, model_cfg, mesh)
  model, schedule, init_args, init_kwargs = (parts.model, parts.schedule, parts.init_args,
                                             parts.init_kwargs)
  restored = None
  if ckpt is not None:  # abstract arrays carry this mesh's shardings: any saved mesh restores
    abstract, shardings = train_state.abstract_state(*init_args, **init_kwargs)
    restored = ckpt.restore_latest(abstract)
  if restored is not None:
    state = ckpt_lib.restore_state(abstract, restored)
    ckpt_lib.restore_data_state(pipeline, restored, config)
    log.info("resumed from checkpoint step %d in %s (saved on mesh %s)", restored.step,
             ckpt.directory, restored.meta.get("mesh"))
  else:
    state, shardings = train_state.create_sharded_state(*init_args, **init_kwargs)
    if config.init.hf_dir:  # continued pretraining: encoder + MLM head from HF, fresh optimizer
      hf_params = hf_init.load_params(config, model_cfg)
      params = dict(state.params)
      for name, subtree in hf_params.items():
        params[name] = jax.device_put(subtree, shardings.params[name])
      state = state.replace(params=params)
      if state.ema_params is not None:  # the EMA target starts from the same weights
        ema = dict(state.ema_params)
        ema.update({k: jax.tree.map(jnp.copy, params[k]) for k in hf_params if k in ema})
        state = state.replace(ema_params=ema)
      log.info("initialised from %s", config.init.hf_dir)
  log.info("model: %s, %.2fM parameters", model_cfg.family,
           train_state.count_params(state.params) / 1e6)
  step_fn = step_lib.make_train_step(model, config, mesh, shardings, schedule)
  return Job(config, mesh, tokenizer, pipeline, model_cfg, model, state, shardings, step_fn)


def check_config(config: ml_collections.ConfigDict, num_devices: int):
  """The one validation pass, before a tokenizer is trained or a file written (bepa-sweep runs
  it for every grid point before the first run). init.hf_dir's shape (and that its weights
  are whole) first: the config is compared with the workdir's checkpoints after this."""
  if config.init.hf_dir:
    hf_init.apply_to_config(config)
  return config_lib.validate(config, num_devices)


# ----------------------------------------------------------------------------- loop
def train(config: ml_collections.ConfigDict, workdir: str):
  """Runs the whole job; returns (final state, last logged metrics)."""
  check_config(config, jax.device_count())
  ckpt = ckpt_lib.Checkpointer(workdir, config.checkpoint)
  ckpt.check_config(config)  # before anything is built or workdir/config.json is rewritten
  ckpt.install_preemption_handler()
  job = build(config, workdir, ckpt=ckpt)
  mesh, pipeline, state, step_fn = job.mesh, job.pipeline, job.state, job.step_fn
  if host_memory.applied():  # set by main() before XLA started; logged once the job is valid
    log.info("train.host_malloc=%s: glibc keeps freed host memory (no per-step page faults)",
             config.train.host_malloc)
  steps = int(config.train.steps)
  if steps == 0:
    return save_initial_state(job, ckpt, workdir), {}
  evaluator = periodic_eval.from_config(config, job.model, job.tokenizer, mesh)  # None: eval off
  tokens = throughput.TokenMeter(config.loss)  # real / processed tokens, counted on the host
  log_every = max(int(config.train.log_every), 1)
  pid, pcount = jax.process_index(), jax.process_count()
  metrics, t_start, step_start, since_start = {}, None, 0, throughput.TokenCounts()
  window, window_steps = None, 0
  profiler = profiling.StepProfiler(config.train, workdir)
  first = int(jax.device_get(state.step))
  writer = MetricWriter(workdir, resume_step=first)
  with jax.set_mesh(mesh):
    for step in range(first, steps):
      profiler.before(step)
      local = local_batch(pipeline, step, pid, pcount)
      tokens.add(local)
      batch = global_batch(local, mesh)
      state, step_metrics = step_fn(state, batch)
      done = step + 1
      profiler.after(done, step_metrics)
      # Logged metrics are means over the steps since the last log (summed on device, no sync).
      window = step_metrics if window is None else jax.tree.map(jnp.add, window, step_metrics)
      window_steps += 1
      if done % log_every == 0 or done == steps or done == first + 1:
        metrics = {k: float(v) / window_steps for k, v in jax.device_get(window).items()}
        if "learning_rate" in step_metrics:  # the current value, not the window's mean
          metrics["learning_rate"] = float(step_metrics["learning_rate"])
        window, window_steps = None, 0
        window_tokens = tokens.take()  # global: summed over processes (3 ints, log steps only)
        metrics["padding_fraction"] = window_tokens.padding_fraction
        ckpt.check(metrics, done)
        now = time.perf_counter()
        if t_start is None:  # the first step includes compilation: start the clock after it
          t_start, step_start = now, done
          rate = float("nan")
        else:
          since_start = since_start + window_tokens
          rate = (done - step_start) / (now - t_start)
        if rate == rate:  # not NaN: throughput is known from the second log on
          metrics["steps_per_sec"] = rate
          metrics["real_tokens_per_sec"] = since_start.real / (now - t_start)
          metrics["processed_tokens_per_sec"] = since_start.processed / (now - t_start)
        writer.write(done, metrics)
        eta = format_eta((steps - done) / rate) if rate == rate and rate > 0 else "?"
        log.info("step %d/%d | loss %.4f | mlm %.4f acc %.3f | con %.4f | x->y %.3f y->x %.3f "
                 "| cos+ %.3f cos- %.3f | %.0f real tok/s, %.0f%% pad | ETA %s",
                 done, steps, metrics["loss"], metrics["mlm_loss"], metrics["mlm_accuracy"],
                 metrics["contrastive_loss"], metrics["acc_x2y"], metrics["acc_y2x"],
                 metrics["pos_cos"], metrics["neg_cos"], metrics.get("real_tokens_per_sec", 0.0),
                 100 * metrics["padding_fraction"], eta)
      if evaluator is not None and evaluator.due(done, steps):
        t_eval = time.perf_counter()
        eval_metrics = evaluator(state.params)
        writer.write(done, eval_metrics, prefix="eval")
        log.info("eval step %d | %s", done, periodic_eval.headline(eval_metrics))
        if t_start is not None:  # keep evaluation time out of the throughput figures
          t_start += time.perf_counter() - t_eval
      evaluated = evaluator is not None and evaluator.due(done, steps)
      if ckpt.step_end(done, steps, state, step_metrics, config=config, pipeline=pipeline,
                       mesh=mesh, extra_metrics={f"eval/{k}": v for k, v in eval_metrics.items()}
                       if evaluated else None):
        break  # preempted: the state at `done` is saved
  profiler.stop(state)  # a run that ends (or is preempted) inside the profiled range
  ckpt.wait()
  ckpt.close()
  writer.close()
  log.info("%s", pipeline.report())  # what the input dropped, redrew or truncated: never silent
  return state, metrics


def save_initial_state(job: Job, ckpt: ckpt_lib.Checkpointer, workdir: str):
  """train.steps=0: the state as built (from init.hf_dir, fresh optimizer) becomes checkpoint 0,
  so that an imported model can be exported, evaluated or trained later without a step."""
  steps = ckpt.steps()
  if steps:
    log.info("train.steps=0: %s already holds checkpoint(s) up to step %d: nothing written",
             ckpt.directory, steps[-1])
  else:
    ckpt.save(0, job.state, config=job.config, data=ckpt_lib.data_state(job.pipeline, 0),
              metrics={}, mesh=job.mesh)
    ckpt.wait()
    source = job.config.init.hf_dir or "a fresh initialisation"
    log.info("train.steps=0: wrote checkpoint 0 (weights from %s, fresh optimizer state) to %s "
             "and the run's config to %s; next: bepa-export --workdir %s --out DIR, or bepa-train "
             "with the same config and --config.train.steps=N to train from it", source,
             ckpt.directory, os.path.join(workdir, "config.json"), workdir)
  ckpt.close()
  return job.state


# ----------------------------------------------------------------------------- CLI
def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "default_config.py"),
        "Python config file with get_config(); override keys with --config.a.b=value.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for the tokenizer, metrics and checkpoints.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs; "
                        "else $BEPA_COORDINATOR_ADDRESS, SLURM, or Cloud TPU auto-detection).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (else from the environment).")
    flags.DEFINE_integer("process_id", None, "This process's index (else from the environment).")
    flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for all processes to join.")
  return flags.FLAGS


def check_override_keys(argv) -> ml_collections.ConfigDict:
  """Unknown `--config.a.b=` keys, or whole sections, -> ConfigError naming the key (with a
  close match); returns the config file's config, before the overrides."""
  import difflib
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "default_config.py")
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith("--config="):
      path = arg.split("=", 1)[1]
  arg = None
  if not os.path.exists(path) and ":" in path:  # configs/x.py:ARG -> get_config(ARG)
    path, arg = path.rsplit(":", 1)
  if not os.path.exists(path):
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location("_bepa_user_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
  except Exception as e:  # noqa: BLE001 -- the user's file: one line, not a traceback
    raise ConfigError(f"{path}: {type(e).__name__}: {cli.one_line(e)}") from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{path}: defines no get_config()")
  try:
    config = module.get_config(arg) if arg is not None else module.get_config()
  except Exception as e:  # noqa: BLE001 -- the user's file: one line, not a traceback
    raise ConfigError(f"{path}: get_config() failed: {type(e).__name__}: "
                      f"{cli.one_line(e)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
  for item in argv:
    if not item.startswith("--config."):
      continue
    key = item[len("--config."):].split("=", 1)[0]
    node = config
    for depth, part in enumerate(key.split(".")):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, known, n=1)
        hint = f" (did you mean '{'.'.join(key.split('.')[:depth] + close)}'?)" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {path}{hint}")
      node = node[part]
    if isinstance(node, ml_collections.ConfigDict):  # replacing it would drop its other keys
      first = next(iter(node.keys()), "KEY")
      raise ConfigError(f"--config.{key} is a section, not a value: set its keys, e.g. "
                        f"--config.{key}.{first}=...")
  return config


_TYPE_NAMES = {bool: "a bool (true or false)", int: "an int", float: "a float", str: "a string",
               tuple: "a tuple"}


def expected_type(config: ml_collections.ConfigDict, key: str) -> str:
  """'an int', 'a tuple ...': what a `--config.KEY=` override of `config` must parse to."""
  value = config_lib.get(config, key)
  return _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


def override_error(e: Exception, argv, config: ml_collections.ConfigDict) -> str:
  """A `--config.KEY=VALUE` that ml_collections could not parse or type-check -> one line naming
  KEY, the type it expects and VALUE (else the error's first line).

  absl reports a bad value as "flag --config.KEY=VALUE: ..."; ConfigDict's type check raises a
  TypeError naming only the field ("Could not override field 'rules' ...").
  """
  import re
  text = cli.one_line(e)
  field = re.search(r"field '([^']+)'", text)
  for arg in reversed(argv):  # the last override of a key is the one that counts
    if not arg.startswith("--config.") or "=" not in arg:
      continue
    key, value = arg[len("--config."):].split("=", 1)
    if text.startswith(f"flag {arg}:") or (field and key.rsplit(".", 1)[-1] == field.group(1)):
      try:
        expected = expected_type(config, key)
      except (KeyError, AttributeError):
        break
      return f"{arg}: config key {key} expects {expected}, got {value!r}"
  return text


def load_config(path: str, overrides) -> ml_collections.ConfigDict:
  """The config of `bepa-train --config PATH *overrides`, parsed exactly as bepa-train parses
  it (in its own flag set); a bad override is a ConfigError naming the key and value."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["bepa-train", *overrides]
  config = check_override_keys(["--config", path, *overrides])
  values = flags.FlagValues()  # the same override parsers as --config FILE, on the loaded file
  config_flags.DEFINE_config_dict("config", config, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    values(argv)  # overrides `config` in place (type-safe: its field types stay)
  except (flags.Error, TypeError, ValueError) as e:
    raise ConfigError(override_error(e, argv[1:], config)) from None
  return values.config


def workdir_problem(workdir: str) -> str | None:
  """Why a local workdir cannot be used (a file, not writable), or None; gs:// is not checked."""
  if "://" in workdir:
    return None
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    return "exists and is not a directory"
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return f"{existing} is not a directory"
  if not os.access(existing, os.W_OK):
    return f"{existing} is not writable"
  return None


def main(argv=None, prog: str = "bepa-train") -> int:
  from absl import flags
  argv = list(sys.argv if argv is None else argv)
  base = None
  try:
    base = check_override_keys(argv[1:])
    FLAGS = _define_flags()
    FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    name = getattr(e, "flagname", "") or str(e)
    if name.startswith("config."):
      return cli.fail(prog, f"unknown config key '{name[len('config.'):]}'")
    return cli.fail(prog, e)
  except (flags.IllegalFlagValueError, TypeError) as e:  # TypeError: ConfigDict's type check
    return cli.fail(prog, override_error(e, argv[1:], base) if base is not None else e)
  except (flags.Error, ValueError, OSError) as e:  # ConfigError is a ValueError
    return cli.fail(prog, e)
  if not FLAGS.workdir:
    return cli.fail(prog, "--workdir is required")
  problem = workdir_problem(FLAGS.workdir)
  if problem:
    return cli.fail(prog, f"--workdir {FLAGS.workdir}: {problem}")
  try:  # before XLA starts its threads (they keep the malloc arena they first use)
    host_memory.configure(FLAGS.config.train.host_malloc)
  except ConfigError as e:
    return cli.fail(prog, e)
  try:  # first thing, before any JAX computation: join the other processes, if any
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           timeout_s=FLAGS.distributed_timeout)
  except (ValueError, distributed.DistributedInitError) as e:
    return cli.fail(prog, e)
  cli.setup_logging(verbose=jax.process_index() == 0)
  return cli.guarded(prog, lambda: train(FLAGS.config, FLAGS.workdir), errors=(BepaError,))


run = cli.entry(main)


if __name__ == "__main__":
  run()
