"""What the bepa-compile tests share: a tiny config, the CLI run in-process, the libtpu mark."""
import os

import pytest

from bepa_jax.aot import libtpu
from bepa_jax.cli import compile as compile_cli
from tests.conftest import REPO

needs_libtpu = pytest.mark.skipif(not libtpu.libtpu_available(),
                                  reason="libtpu not installed (pip install -e '.[test]')")
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")
B, D = 40, 64  # B differs from every other dimension, so a B x B buffer is unambiguous
TINY = [f"--config.train.global_batch={B}", f"--config.model.hidden_size={D}",
        "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.model.intermediate_size=128", "--config.model.vocab_size=128",
        "--config.data.max_length=16", "--config.model.max_position_embeddings=24",
        "--config.data.max_predictions_per_seq=2", "--config.mesh.data=-1"]


def tiny(*extra):
  from bepa_jax.config import load as config_load
  return config_load.load_config(QUICKSTART, TINY[:] + list(extra))


def run_cli(capsys, *args):
  code = compile_cli.main(["--config", QUICKSTART, *args])
  out, err = capsys.readouterr()
  return code, out, [line for line in err.splitlines() if "error" in line]
