"""Evaluation inside the training loop (config `eval.*`), logged with prefix "eval".

The evaluation sets are read once when training starts, and the embedding function is
compiled once; every `eval.every_steps` steps (and after the last one) the current params
are embedded on the training mesh and scored. Every process runs it (it is one sharded
computation); the MetricWriter writes on process 0 only.
"""
from __future__ import annotations

import logging

from bepa_jax.config import validate as config_lib
from bepa_jax import mesh as mesh_lib
from bepa_jax.errors import BepaError, ConfigError
from bepa_jax.eval import embed, suite

log = logging.getLogger("bepa")


class PeriodicEval:
  """`evaluator(params) -> {name: value}`; `evaluator.due(step, last_step)` says when."""

  def __init__(self, config, model, tokenizer, mesh):
    e = config.eval
    self.every = int(e.every_steps)
    self.poolings = tuple(config_lib.split_list(e.pooling))
    self.margin = e.margin or None
    try:
      self.sets = suite.load_sets(e.tatoeba_dir or None, config_lib.split_list(e.langs), config_lib.split_list(e.parallel),
                                  int(e.max_sentences) or None)
    except BepaError as err:  # a missing file: name the key that pointed at it
      raise ConfigError(f"eval: {err}") from None
    self.embedder = embed.Embedder(model, None, tokenizer, mesh,
                                   max_length=int(config.data.max_length),
                                   batch_size=int(e.batch_size), rules=mesh_lib.rules(config.mesh))

  def due(self, step: int, last_step: int) -> bool:
    return step % self.every == 0 or step == last_step

  def __call__(self, params) -> dict[str, float]:
    self.embedder.params = params
    report, _ = suite.run(self.embedder, self.sets, poolings=self.poolings, margin=self.margin)
    self.embedder.params = None  # do not keep a donated buffer alive
    return suite.flatten(report)


def from_config(config, model, tokenizer, mesh) -> PeriodicEval | None:
  """None when eval.every_steps is 0 (or the config has no eval section)."""
  if getattr(config, "eval", None) is None or int(config.eval.every_steps) <= 0:
    return None
  return PeriodicEval(config, model, tokenizer, mesh)


def headline(metrics: dict) -> str:
  """A short log line: Tatoeba average and the [CLS] diagnostics, when present."""
  keys = [k for k in metrics if k.startswith("retrieval/tatoeba_average/cls/")
          or k in ("diagnostics/cls/effective_rank", "diagnostics/cls/gap")]
  keys += [k for k in metrics if k.startswith("retrieval/parallel/") and "/cls/" in k][:2]
  return " | ".join(f"{k.split('/', 1)[1]} {metrics[k]:.3f}" for k in keys)
