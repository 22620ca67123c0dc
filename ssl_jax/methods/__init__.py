"""Pretraining methods: one file each, all offering `base.Method` to the trainer."""

import importlib

import ml_collections

from ssl_jax.errors import ConfigError
from ssl_jax.methods.base import Method

# config.method -> (module, class). Imported lazily: a method's imports are its own.
METHODS = {
    'mae': ('ssl_jax.methods.mae', 'MAE'),
    'simclr': ('ssl_jax.methods.simclr', 'SimCLR'),
    'dino': ('ssl_jax.methods.dino', 'DINO'),
    'bert': ('ssl_jax.methods.bert', 'BERT'),
    'gpt': ('ssl_jax.methods.gpt', 'GPT'),
}


def create(config: ml_collections.ConfigDict) -> Method:
  """Instantiates the method named by `config.method` with the resolved config."""
  if config.method not in METHODS:
    raise ConfigError(f'config.method={config.method!r} is not one of {sorted(METHODS)}')
  module_name, class_name = METHODS[config.method]
  return getattr(importlib.import_module(module_name), class_name)(config)
