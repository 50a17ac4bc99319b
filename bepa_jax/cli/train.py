"""`bepa-train`: flags, the workdir and the processes checked, then the training loop.

  bepa-train --config configs/quickstart.py --config.train.steps=200 --workdir DIR
"""
from __future__ import annotations

import os
import sys

import jax

from bepa_jax import distributed
from bepa_jax import host_memory
from bepa_jax.cli import common as cli
from bepa_jax.config import load as config_load
from bepa_jax.errors import BepaError, ConfigError
from bepa_jax.trainer import loop


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file(
        "config", config_load.DEFAULT_CONFIG_FILE,
        "Python config file with get_config(); override keys with --config.a.b=value.",
        lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for the tokenizer, metrics and checkpoints.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host runs; "
                        "else $BEPA_COORDINATOR_ADDRESS, SLURM, or Cloud TPU auto-detection).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (else from the environment).")
    flags.DEFINE_integer("process_id", None, "This process's index (else from the environment).")
    flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for all processes to join.")
  return flags.FLAGS




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
    base = config_load.check_override_keys(argv[1:])
    FLAGS = _define_flags()
    FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    name = getattr(e, "flagname", "") or str(e)
    if name.startswith("config."):
      return cli.fail(prog, f"unknown config key '{name[len('config.'):]}'")
    return cli.fail(prog, e)
  except (flags.IllegalFlagValueError, TypeError) as e:  # TypeError: ConfigDict's type check
    return cli.fail(prog, config_load.override_error(e, argv[1:], base) if base is not None else e)
  except (flags.Error, ValueError, OSError) as e:  # ConfigError is a ValueError
    return cli.fail(prog, e)
  if not FLAGS.workdir:
    return cli.fail(prog, "--workdir is required")
  return start(prog, FLAGS.config, FLAGS.workdir, coordinator_address=FLAGS.coordinator_address,
               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
               timeout_s=FLAGS.distributed_timeout)


def start(prog: str, config, workdir: str, **processes) -> int:
  """What a training command does once its config is parsed (bepa-train, bepa-ckpt import):
  the workdir checked and made absolute, host memory and the processes set up (before XLA
  starts), then the training loop. `processes`: distributed.initialize's arguments."""
  problem = workdir_problem(workdir)
  if problem:
    return cli.fail(prog, f"--workdir {workdir}: {problem}")
  workdir = cli.absolute(workdir)  # once: Orbax and every later path need it absolute
  try:  # before XLA starts its threads (they keep the malloc arena they first use)
    host_memory.configure(config.train.host_malloc)
  except ConfigError as e:
    return cli.fail(prog, e)
  try:  # first thing, before any JAX computation: join the other processes, if any
    distributed.initialize(**processes)
  except (ValueError, distributed.DistributedInitError) as e:
    return cli.fail(prog, e)
  cli.setup_logging(verbose=jax.process_index() == 0)
  return cli.guarded(prog, lambda: loop.train(config, workdir), errors=(BepaError,))

run = cli.entry(main)


if __name__ == "__main__":
  run()
