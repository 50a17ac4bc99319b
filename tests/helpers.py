"""Small shared helpers for tests: a tiny config and a job built on chosen devices."""
import jax

from bepa_jax import default_config


def tiny_config(**overrides):
  c = default_config.get_config()
  c.model.hidden_size = 32
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.intermediate_size = 64
  c.model.hidden_dropout = 0.0
  c.model.attention_dropout = 0.0
  c.data.max_length = 16
  c.data.max_predictions_per_seq = 3
  c.tokenizer.vocab_size = 400
  c.train.global_batch = 16
  c.train.steps = 10
  c.train.log_every = 5
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"
  for key, value in overrides.items():
    node = c
    parts = key.split(".")
    for p in parts[:-1]:
      node = node[p]
    node[parts[-1]] = value
  return c


def devices(n):
  return jax.devices()[:n]
