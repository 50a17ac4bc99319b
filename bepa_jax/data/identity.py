"""The identity of a data stream: what a checkpoint records of the input and a resume checks.

A batch is a pure function of (settings, step), so the position saved is the step; `stream`
(every setting the batches depend on, by config key) and its digest let a resume on other data
stop with the changed keys instead of training on other batches silently.
"""
from __future__ import annotations

import hashlib
import json

from bepa_jax.errors import ConfigError


# keys set by the code, not by the config: what their change means
NOTES = {"batch plan version": "this version of the code draws other batches than the one "
                               "that saved the checkpoint"}


def digest(stream: dict) -> str:
  """A short hash of a stream description."""
  return hashlib.sha1(json.dumps(stream, sort_keys=True).encode()).hexdigest()[:16]


def state_dict(stream: dict, step: int, start_step: int) -> dict:
  """The position saved in a checkpoint: the step (a pure function), where this data stream
  started (`continue_on_new_data`), and what the stream depends on."""
  return {"next_step": int(step), "start_step": int(start_step),
          "data_fingerprint": digest(stream), "stream": stream}


def changes(now: dict, state: dict) -> list[str]:
  """The settings that differ between a checkpoint's data state and the stream `now`."""
  saved = state.get("stream")
  if saved is not None:
    keys = sorted(set(now) | set(saved))
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" + (f" ({NOTES[k]})" if k in NOTES else "")
            for k in keys if saved.get(k) != now.get(k)]
  if state.get("data_fingerprint") not in (None, digest(now)):
    return [f"data fingerprint {state['data_fingerprint']} -> {digest(now)}"]
  return []


def verify_state(now: dict, state: dict, *, continue_on_new_data: bool = False
                 ) -> tuple[list[str], int]:
  """Checks a checkpoint's data state against the stream `now`: -> (the changes, the step at
  which this stream's position 0 lies).

  A change (other sources, seed, batch, lengths, masking or tokenizer) stops with one line
  naming the keys: the batches after the saved step would differ silently. With
  `continue_on_new_data` the change is accepted and this stream starts at its position 0
  at the saved step (kept in later checkpoints, so a second resume continues it).
  """
  step = int(state.get("next_step", 0))
  found = changes(now, state)
  if not found:
    return found, int(state.get("start_step", 0))
  if continue_on_new_data:
    return found, step
  raise ConfigError(
      f"the checkpoint at step {step} was trained on other data ({'; '.join(found)}): "
      f"resume with the saved values, use a new --workdir, or set "
      f"data.continue_on_new_data=True to train on this data from its start")
