"""data.workers: batches built in worker processes (data/feeder.py) are bitwise those of the
training process, in step order, with its counts; a worker that dies or raises stops the feed
with one line naming it and the step (trainer/feed.py raises it when that step's batch is due).
"""
import multiprocessing
import os
import signal

import numpy as np
import pytest

from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  """(specs, tokenizer, pipeline) of a tiny packed run whose data stream starts at step 2."""
  from bepa_jax.data import factory
  from bepa_jax.trainer import build as build_lib
  specs = build_lib.check_config(tiny_config(**{"data.packing": True, "data.max_length": 32}), 8)
  tok = factory.load_tokenizer(specs, str(tmp_path_factory.mktemp("feeder")))
  pipe = factory.build_pipeline(specs, tok, 8)
  pipe.start_step = 2  # as after a resume with data.continue_on_new_data
  return specs, tok, pipe


def _recipe(parts, make=None, pid=1, pcount=2):
  from bepa_jax.data import feeder
  specs, tok, pipe = parts
  extra = {"make": make} if make is not None else {}
  return feeder.Recipe(specs, tok, pipe.packer.batch_shards, pipe.start_step, pid, pcount, **extra)


def test_workers_build_the_training_process_batches_bitwise(parts):
  """Process 1 of 2, steps 3..8 from 2 workers: the arrays (values and dtypes) and the counts
  (duplicates replaced, truncations) equal those the pipeline gives in this process."""
  from bepa_jax.data import feeder
  _, _, pipe = parts
  got, tallies = {}, []
  with feeder.Feeder(None, 3, 9, workers=2, prefetch=3, recipe=_recipe(parts)) as f:
    for step, local, info in f:
      got[step] = local
      tallies.append(info["tally"])
      assert info["worker"] == (step - 3) % 2
  assert sorted(got) == list(range(3, 9))
  before = pipe.counters.copy()
  for step, local in got.items():
    ref = pipe.batch(step, 1, 2)
    assert sorted(local) == sorted(ref)
    for key in ref:
      assert local[key].dtype == ref[key].dtype and np.array_equal(local[key], ref[key]), key
  done = pipe.counters - before
  assert done["truncated"] > 0  # the counts are compared for real
  merged = type(pipe.counters)()
  for t in tallies:
    merged.update({k[len("count."):]: v for k, v in t.items()})
  assert merged == done


def _die_at_5(pipeline, step, pid, pcount):
  if step == 5:
    os.kill(os.getpid(), signal.SIGKILL)
  return pipeline.batch(step, pid, pcount)


def _raise_at_5(pipeline, step, pid, pcount):
  if step == 5:
    from bepa_jax.errors import InputError
    raise InputError("corpus.tsv:12: not UTF-8")
  return pipeline.batch(step, pid, pcount)


@pytest.mark.parametrize("fault", ["killed", "raises"])
def test_a_failing_worker_stops_the_feed_with_one_line_naming_it(parts, fault):
  """Worker 1 of 2 builds steps 3, 5, 7 and fails at 5. Raising: steps 3 and 4 are used, the
  error, met while step 4 runs (ahead), is raised when step 5 is taken. Killed: the batches it
  had built but not handed over die with it (step 3 or 5). Then no worker is left."""
  from bepa_jax.data import feeder
  from bepa_jax.trainer import feed
  make = _die_at_5 if fault == "killed" else _raise_at_5
  host = feeder.Feeder(None, 3, 9, workers=2, prefetch=2, recipe=_recipe(parts, make))
  dev = feed.DeviceFeed(host, lambda local: local, pipeline=None)
  taken = []
  with dev:
    with pytest.raises(feeder.DataWorkerError) as e:
      for step in range(3, 9):
        local, _ = dev.take(step)
        assert local["input_ids"].shape[0] > 0
        taken.append(step)
        dev.ahead()
    workers = {p.pid for p in multiprocessing.active_children()}
  message = str(e.value)
  assert "\n" not in message and message.startswith("data worker 1 of 2 (pid "), message
  if fault == "killed":
    assert taken in ([], [3, 4]), taken
    assert f"died (exit code -9, SIGKILL) before handing over the batch of step {taken and 5 or 3}" \
        in message, message
  else:
    assert taken == [3, 4]
    assert "failed building the batch of step 5: corpus.tsv:12: not UTF-8;" in message, message
  assert not workers & {p.pid for p in multiprocessing.active_children()}  # none outlives it


def test_workers_without_grain_are_refused_in_the_validation_pass(monkeypatch):
  import importlib.util
  from bepa_jax.config import validate
  from bepa_jax.errors import ConfigError
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "grain" else real(name, *a))
  with pytest.raises(ConfigError, match=r"data.workers=2 needs the grain package"):
    validate.validate(tiny_config(**{"data.workers": 2}), 8)
  validate.validate(tiny_config(**{"data.workers": 0}), 8)  # built here: no grain needed
