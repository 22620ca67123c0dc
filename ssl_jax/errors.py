"""Errors a user causes and can fix; `ssl_jax.main` prints them without a traceback."""


class UserError(Exception):
  """Base of errors whose message tells the user what was wrong and what to do."""


class ConfigError(UserError, ValueError):
  """A config value is missing, unknown or inconsistent."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint exists but cannot be restored into the current run."""


class DataError(UserError, ValueError):
  """A data source or data config the user supplied is missing or malformed."""


class DivergedError(UserError, RuntimeError):
  """Too many consecutive train steps had a non-finite loss or gradient: the run stopped."""
