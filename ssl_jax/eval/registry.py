"""The evaluations a config may enable, by name, and the setup-time check of a config.

`config.eval.<name>` is the block of evaluation `<name>` (its defaults are in
`ssl_jax.config_blocks.evaluation_blocks`): `enabled`, `every` (its cadence) and
its own settings. A new evaluation (e.g. fine-tuning) is a class with
`requires`, `run` and `summary` (see `base.Evaluation`), an entry here and
a default block there.
"""

import ml_collections

from ssl_jax.config_blocks import evaluation_blocks
from ssl_jax.errors import ConfigError
from ssl_jax.eval.base import Context, Evaluation
from ssl_jax.eval.held_out import HeldOut
from ssl_jax.eval.pictures import Pictures
from ssl_jax.eval.probes import KNN, LinearProbe, OnlineProbe
from ssl_jax.methods.base import CAPABILITIES, Method

REGISTRY: dict[str, type[Evaluation]] = {
    'knn': KNN,
    'linear_probe': LinearProbe,
    'online_probe': OnlineProbe,
    'held_out': HeldOut,
    'pictures': Pictures,
}
assert set(REGISTRY) == set(evaluation_blocks()), 'every evaluation needs a default config block'


def enabled(config: ml_collections.ConfigDict) -> list[str]:
  """Names of the evaluations `config.eval` switches on, in registry order."""
  return [name for name in REGISTRY if config.eval[name].enabled]


def check(config: ml_collections.ConfigDict, method_class: type[Method]) -> None:
  """ConfigError naming the first enabled evaluation the method or the config cannot serve.

  Runs at setup, before any data is read or any step is taken.
  """
  for name in enabled(config):
    evaluation = REGISTRY[name]
    if evaluation.requires not in method_class.capabilities:
      offered = sorted(method_class.capabilities) or ['none']
      hooks = ', '.join(CAPABILITIES[evaluation.requires])
      raise ConfigError(
          f'config.eval.{name}.enabled=True, but method {config.method!r} cannot do it: '
          f'{name} needs the {evaluation.requires!r} capability ({hooks}); '
          f'{config.method} offers {", ".join(offered)}. '
          f'Set --config.eval.{name}.enabled=False.')
    if evaluation.uses_labels and not (config.eval.train_source and config.eval.test_source):
      raise ConfigError(
          f'config.eval.{name}.enabled=True needs labelled splits: set '
          'config.eval.train_source and config.eval.test_source (e.g. digits:train and '
          'digits:test).')
    every = config.eval[name].every
    if every is not None and every < 0:
      raise ConfigError(f'config.eval.{name}.every={every}: expected steps >= 0 '
                        '(0: only at the end; unset: config.train.eval_every)')


def create(context: Context) -> list[Evaluation]:
  """The enabled evaluations of `context.config`, built once for the run."""
  return [REGISTRY[name](name, context.config.eval[name], context)
          for name in enabled(context.config)]
