"""The quickstart config learns: its loss falls over 30 steps (8 simulated devices)."""
import json

import numpy as np

from bepa_jax.config import defaults as default_config
from bepa_jax.trainer import loop


def test_quickstart_loss_falls_over_30_steps(tmp_path):
  config = default_config.get_config()
  config.train.steps = 30
  config.train.log_every = 1
  loop.train(config, str(tmp_path))
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == list(range(1, 31))
  loss = np.array([r["train/loss"] for r in records])
  mlm = np.array([r["train/mlm_loss"] for r in records])
  assert np.all(np.isfinite(loss))
  assert loss[-5:].mean() < loss[:3].mean() - 0.5, loss
  assert mlm[-5:].mean() < mlm[:3].mean() - 0.5, mlm
  assert (tmp_path / "tokenizer" / "spm.model").exists()
  assert (tmp_path / "config.json").exists()
  assert list((tmp_path / "tensorboard").iterdir())
