"""Errors a user can fix. The CLIs print their one-line message and exit with status 2."""


class BepaError(Exception):
  """Base of errors caused by user input (config, files, flags), not by a bug."""


class ConfigError(BepaError, ValueError):
  """A configuration that cannot run. The message names the key."""


class InputError(BepaError, ValueError):
  """Bad input data: the message names the file, line or field."""


class HFFormatError(InputError):
  """An HF checkpoint / config that cannot be converted (bepa_jax/hf/). The message is one line
  naming the file or key, so callers let it through as it is."""


def one_line(e: BaseException) -> str:
  """An exception's first line (or its type's name): what every one-line error prints."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__
