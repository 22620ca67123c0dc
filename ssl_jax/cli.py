"""What the command-line entry points (ssl_jax.main, ssl_jax.sample) share."""

import logging as std_logging

from absl import flags, logging
from absl.logging import converter


def quiet_logging() -> None:
  """Logs at --verbosity, warnings by default.

  absl leaves Python's root logger at INFO, where jax, Orbax and grain log
  every backend probe and save.
  """
  verbosity = flags.FLAGS.verbosity if flags.FLAGS['verbosity'].present else -1
  std_logging.getLogger().setLevel(converter.absl_to_standard(verbosity))
  logging.set_verbosity(verbosity)
