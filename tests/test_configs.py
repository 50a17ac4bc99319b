"""Every file in configs/ loads and passes validation on a pod-sized device count."""
import glob
import importlib.util
import os

import pytest

from bepa_jax.config import validate as config_lib
from tests.conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_is_valid(path):
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  micro = c.train.global_batch // c.train.grad_accum_steps
  devices = 64 if micro >= 64 else 8  # e.g. a v5e-64 slice
  data, fsdp, tensor = config_lib.validate(c, devices)
  assert data * fsdp * tensor == devices


def test_reference_config_variants():
  """configs/bepa_reference.py: the authors' pool (16 x 4 accumulated) or one global pool."""
  from ml_collections import config_flags  # noqa: F401  (the loader bepa-train uses)
  spec = importlib.util.spec_from_file_location("ref", os.path.join(REPO, "configs",
                                                                    "bepa_reference.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  authors, glob_ = module.get_config(), module.get_config("global,opus100=/d")
  assert (authors.train.global_batch, authors.train.grad_accum_steps) == (64, 4)
  assert (glob_.train.global_batch, glob_.train.grad_accum_steps) == (64, 1)
  assert authors.train.steps == 21_875 and authors.loss.mlm_input == "pair"
  assert authors.loss.cls_input == "clean" and not authors.loss.mask_self
  assert glob_.data.source.count("aligned:/d/en-") == 14
  config_lib.validate(glob_, 64)
  with pytest.raises(ValueError, match="expected authors|global"):
    module.get_config("huge")


def test_every_config_file_named_in_launchers_and_docs_exists():
  import re
  named = set()
  docs = [os.path.join(REPO, "README.md")] + glob.glob(os.path.join(REPO, "docs", "*.md"))
  for path in glob.glob(os.path.join(REPO, "launch", "*.py")) + docs:
    with open(path, encoding="utf-8") as f:
      named |= set(re.findall(r"configs/[A-Za-z0-9_]+\.py", f.read()))
  assert named, "expected launch/, README.md and docs/ to name config files"
  missing = sorted(n for n in named if not os.path.isfile(os.path.join(REPO, n)))
  assert not missing, f"named but absent: {missing}"


# --- one source of truth: default_config.py names every key, and every key reaches its user

# The loss keys whose dataclass field has another name.
OPTION_KEYS = {"same_language": "same_language_negatives", "chunk": "contrastive_chunk"}


def _changed(value):
  """A value of the same type that differs from `value`."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + 3
  return value + "_x"


def test_every_encoder_field_has_a_default_key_and_no_override_is_dropped():
  import dataclasses

  from bepa_jax.config import defaults as default_config
  from bepa_jax.model import EncoderConfig
  c = default_config.get_config()
  fields = [f.name for f in dataclasses.fields(EncoderConfig)]
  assert sorted(c.model.keys()) == sorted(fields)
  for name in fields:  # each key set on its own to a new value arrives in the dataclass
    c = default_config.get_config()
    c.model[name] = _changed(c.model[name])
    assert getattr(EncoderConfig.from_config(c.model, vocab_size=7), name) == c.model[name], name


def test_every_infonce_option_has_a_default_key_and_no_override_is_dropped():
  import dataclasses

  from bepa_jax.config import defaults as default_config
  from bepa_jax.objective.infonce import Options
  for f in dataclasses.fields(Options):
    key = OPTION_KEYS.get(f.name, f.name)
    c = default_config.get_config()
    assert key in c.loss, f"loss.{key} (Options.{f.name}) has no default in default_config.py"
    assert c.loss[key] == f.default, f"loss.{key}: default_config and Options disagree"
    new = {"symmetric": "sum", "negatives": "local"}.get(f.name, _changed(c.loss[key]))
    c.loss[key] = new
    assert getattr(Options.from_config(c.loss), f.name) == new, key


def test_unknown_model_key_is_refused_not_dropped():
  from bepa_jax.config import defaults as default_config
  c = default_config.get_config()
  c.model.hidden_sise = 64
  with pytest.raises(config_lib.ConfigError, match=r"model\.hidden_sise is not an encoder"):
    config_lib.validate(c, 8)  # the one place the rule lives (EncoderConfig takes valid keys)


def test_fused_qkv_override_from_the_readme_is_accepted(tmp_path):
  from bepa_jax.config import load as config_load
  path = os.path.join(REPO, "bepa_jax", "config", "defaults.py")
  config_load.check_override_keys(["bepa-train", f"--config={path}", "--config.model.fused_qkv=True"])


@pytest.mark.parametrize("overrides, fragment", [
    ({"mesh.rules": (("batch", "dataa"),)}, "mesh axes must be None or among"),
    ({"mesh.rules": (("batch",),)}, "is not a (logical axis, mesh axes) pair"),
    ({"checkpoint.keep": 0}, "checkpoint.keep"),
    ({"checkpoint.every_minutes": -1.0}, "checkpoint.every_minutes must be >= 0"),
    ({"checkpoint.keep_best_mode": "median"}, "checkpoint.keep_best_mode='median'"),
    ({"train.host_malloc": "tcmalloc"}, "train.host_malloc"),
    ({"train.profile_steps": -1}, "train.profile_steps"),
    ({"data.workers": -1}, "data.workers=-1 / data.prefetch=2 must be >= 0"),
    ({"data.workers": 2, "data.prefetch": 0}, "data.workers=2 needs data.prefetch >= 1"),
    ({"eval.every_steps": 5}, "eval.every_steps > 0 needs"),
    ({"eval.every_steps": 5, "eval.parallel": "/nonexistent/a.en,/nonexistent/a.de"},
     "eval.parallel: /nonexistent/a.en"),
])
def test_validate_covers_every_section_in_one_line(overrides, fragment):
  from tests.helpers import tiny_config
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(tiny_config(**overrides), 8)
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_bad_eval_settings_stop_before_the_tokenizer_is_trained(tmp_path):
  """The validation pass runs before anything is built: no tokenizer, no config.json."""
  from bepa_jax.trainer import loop
  from tests.helpers import tiny_config
  for lang in ("en", "de"):
    (tmp_path / f"dev.{lang}").write_text("a\nb\n")
  files = f"{tmp_path}/dev.en,{tmp_path}/dev.de"
  cfg = tiny_config(**{"eval.every_steps": 2, "eval.parallel": files, "eval.pooling": "max"})
  with pytest.raises(config_lib.ConfigError, match=r"eval\.pooling"):
    loop.train(cfg, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "tokenizer")
  assert not os.path.exists(tmp_path / "run" / "config.json")
