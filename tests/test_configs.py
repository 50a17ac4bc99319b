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


def test_every_config_file_named_in_launchers_and_docs_exists():
  import re
  named = set()
  for path in glob.glob(os.path.join(REPO, "launch", "*.py")) + [os.path.join(REPO, "README.md")]:
    with open(path, encoding="utf-8") as f:
      named |= set(re.findall(r"configs/[A-Za-z0-9_]+\.py", f.read()))
  assert named, "expected launch/ and README.md to name config files"
  missing = sorted(n for n in named if not os.path.isfile(os.path.join(REPO, n)))
  assert not missing, f"named but absent: {missing}"
