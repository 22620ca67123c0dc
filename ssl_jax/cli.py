"""What the command-line entry points (ssl_jax.main, ssl_jax.sample, ssl_jax.probe) share."""

import logging as std_logging
import re
import sys

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


def parse_config_flags(argv: list[str], usage: str) -> list[str]:
  """absl parsing, with unknown `--config.` keys reported by their full name; exits on error."""
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:
    bad = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    unknown = [a for a in bad if not _config_has(a[len('--config.'):])]
    hint = re.search(r'Did you mean "\w+"', str(e))
    sys.exit(f'error: unknown config key {", ".join(unknown or bad)}'
             + (f' ({hint.group(0).lower()}?)' if hint else '') +
             '\nThe keys are those of the config file (and of WORKDIR/config.json).')
  except flags.Error as e:
    message = str(e)
    if 'Traceback' in message:  # A config file that raised: keep its last line.
      lines = [line for line in message.splitlines() if line.strip()]
      message = f'{lines[0]} {lines[-1]}'
    sys.exit(f'error: {message}\nUsage: {usage}')


def _config_has(dotted: str) -> bool:
  """Whether the config file named by --config has the dotted key (best effort)."""
  try:
    node = flags.FLAGS['config'].value
  except Exception:  # The config itself did not load.
    return False
  for part in dotted.split('.'):
    if node is None or not hasattr(node, 'keys') or part not in node:
      return False
    node = node[part]
  return True
