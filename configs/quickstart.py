"""Tiny BEPA run on the bundled corpus, on CPU: the embedded default, unchanged.

  bepa-train --config configs/quickstart.py --workdir workdirs/quickstart
"""
from bepa_jax.config import defaults as default_config


def get_config():
  return default_config.get_config()
