"""The one config reader: a Python config file with `--config.a.b=value` overrides, or the
config.json a run saved in its workdir, always over the embedded defaults.

Every bad file, key or value is a `ConfigError` whose one-line message names it.
"""
from __future__ import annotations

import json
import os

import ml_collections

from bepa_jax.config import defaults
from bepa_jax.errors import ConfigError, InputError, one_line

DEFAULT_CONFIG_FILE = defaults.__file__


def get(config, dotted):
  """config["a"]["b"] for "a.b"."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


_TYPE_NAMES = {bool: "a bool (true or false)", int: "an int", float: "a float", str: "a string",
               tuple: "a tuple"}

def check_override_keys(argv) -> ml_collections.ConfigDict:
  """Unknown `--config.a.b=` keys, or whole sections, -> ConfigError naming the key (with a
  close match); returns the config file's config, before the overrides."""
  import difflib
  import importlib.util
  path = DEFAULT_CONFIG_FILE
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith("--config="):
      path = arg.split("=", 1)[1]
  arg = None
  if not os.path.exists(path) and ":" in path:  # configs/x.py:ARG -> get_config(ARG)
    path, arg = path.rsplit(":", 1)
  if not os.path.exists(path):
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location("_bepa_user_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
  except Exception as e:  # noqa: BLE001 -- the user's file: one line, not a traceback
    raise ConfigError(f"{path}: {type(e).__name__}: {one_line(e)}") from None
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{path}: defines no get_config()")
  try:
    config = module.get_config(arg) if arg is not None else module.get_config()
  except Exception as e:  # noqa: BLE001 -- the user's file: one line, not a traceback
    raise ConfigError(f"{path}: get_config() failed: {type(e).__name__}: "
                      f"{one_line(e)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict")
  for item in argv:
    if not item.startswith("--config."):
      continue
    key = item[len("--config."):].split("=", 1)[0]
    node = config
    for depth, part in enumerate(key.split(".")):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, known, n=1)
        hint = f" (did you mean '{'.'.join(key.split('.')[:depth] + close)}'?)" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {path}{hint}")
      node = node[part]
    if isinstance(node, ml_collections.ConfigDict):  # replacing it would drop its other keys
      first = next(iter(node.keys()), "KEY")
      raise ConfigError(f"--config.{key} is a section, not a value: set its keys, e.g. "
                        f"--config.{key}.{first}=...")
  return config




def expected_type(config: ml_collections.ConfigDict, key: str) -> str:
  """'an int', 'a tuple ...': what a `--config.KEY=` override of `config` must parse to."""
  value = get(config, key)
  return _TYPE_NAMES.get(type(value), f"a {type(value).__name__}")




def override_error(e: Exception, argv, config: ml_collections.ConfigDict) -> str:
  """A `--config.KEY=VALUE` that ml_collections could not parse or type-check -> one line naming
  KEY, the type it expects and VALUE (else the error's first line).

  absl reports a bad value as "flag --config.KEY=VALUE: ..."; ConfigDict's type check raises a
  TypeError naming only the field ("Could not override field 'rules' ...").
  """
  import re
  text = one_line(e)
  field = re.search(r"field '([^']+)'", text)
  for arg in reversed(argv):  # the last override of a key is the one that counts
    if not arg.startswith("--config.") or "=" not in arg:
      continue
    key, value = arg[len("--config."):].split("=", 1)
    if text.startswith(f"flag {arg}:") or (field and key.rsplit(".", 1)[-1] == field.group(1)):
      try:
        expected = expected_type(config, key)
      except (KeyError, AttributeError):
        break
      return f"{arg}: config key {key} expects {expected}, got {value!r}"
  return text




def load_config(path: str, overrides) -> ml_collections.ConfigDict:
  """The config of `bepa-train --config PATH *overrides`, parsed exactly as bepa-train parses
  it (in its own flag set); a bad override is a ConfigError naming the key and value."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["bepa-train", *overrides]
  config = check_override_keys(["--config", path, *overrides])
  values = flags.FlagValues()  # the same override parsers as --config FILE, on the loaded file
  config_flags.DEFINE_config_dict("config", config, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    values(argv)  # overrides `config` in place (type-safe: its field types stay)
  except (flags.Error, TypeError, ValueError) as e:
    raise ConfigError(override_error(e, argv[1:], config)) from None
  return values.config


# ----------------------------------------------------------------------------- saved runs
def read_saved(workdir: str) -> ml_collections.ConfigDict:
  """The config.json that bepa-train wrote, over the defaults (so new keys have values)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise InputError(f"{path}: not found (is {workdir} a bepa-train workdir?)")
  try:
    with open(path) as f:
      saved = json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: not valid JSON ({e})") from None
  config = defaults.get_config()
  for section, values in saved.items():
    if section in config and isinstance(values, dict):
      for k, v in values.items():
        if k in config[section]:
          config[section][k] = tuple(map(tuple, v)) if k == "rules" else v
  return config
