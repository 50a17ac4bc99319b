"""The typed specs: one frozen dataclass per config section, built once from a valid config."""
import dataclasses

import pytest

from bepa_jax.config import defaults
from bepa_jax.config import specs as specs_lib
from bepa_jax.config import validate as config_lib


def test_every_config_key_is_a_typed_spec_field_and_nothing_else():
  c = defaults.get_config()
  s = specs_lib.Specs.from_config(c)
  for section in c.keys():
    spec = getattr(s, section)
    fields = {f.name for f in dataclasses.fields(spec)}
    assert fields == set(c[section].keys()), section
    for key in fields:  # the declared type, the config's value
      got, want = getattr(spec, key), c[section][key]
      assert got == (tuple(map(lambda r: (r[0], tuple(r[1]) if isinstance(r[1], (list, tuple))
                                          else r[1]), want)) if key == "rules" else want), key
      assert type(got) is type(want) or (isinstance(want, int) and type(got) is float), key


def test_specs_are_frozen_and_overrides_arrive():
  c = defaults.get_config()
  c.data.max_length, c.train.global_batch, c.loss.temperature = 64, 48, 0.05
  s = specs_lib.Specs.from_config(c)
  assert (s.data.max_length, s.train.global_batch, s.loss.temperature) == (64, 48, 0.05)
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.data.max_length = 3
  assert s.model.vocab_size == 0 and s.with_vocab(123).model.vocab_size == 123


def test_derived_values_have_one_definition_for_config_and_spec():
  c = defaults.get_config()
  c.train.grad_accum_steps = 4
  s = specs_lib.Specs.from_config(c)
  assert config_lib.packing_micro_batches(s.train) == config_lib.packing_micro_batches(c.train) == 4
