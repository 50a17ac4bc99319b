"""Every file in configs/ loads and passes validation on a pod-sized device count."""
import glob
import importlib.util
import os

import pytest

from bepa_jax import config as config_lib
from tests.conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_valid(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  devices = 64 if c.train.global_batch >= 64 else 8  # e.g. a v5e-64 slice
  data, fsdp, tensor = config_lib.validate(c, devices)
  assert data * fsdp * tensor == devices
