"""Methods, one file each, all offering `base.Method`; the registry and exports.

The pretraining methods, and `finetune`, a classifier trained on an export.

`create(config)` builds the method a config names; `method_class(config)`
gives its class (what it declares: data, capabilities) before anything is
built; `load_encoder(directory)` rebuilds an exported encoder with its method.
"""

import importlib

import jax
import ml_collections
from absl import logging
from etils import epath
from flax import nnx

from ssl_jax import checkpoint, sharding
from ssl_jax.config_blocks import mesh_config
from ssl_jax.errors import ConfigError
from ssl_jax.methods.base import Method

# config.method -> (module, class). Imported lazily: a method's imports are its own.
METHODS = {
    'mae': ('ssl_jax.methods.mae', 'MAE'),
    'simclr': ('ssl_jax.methods.simclr', 'SimCLR'),
    'dino': ('ssl_jax.methods.dino', 'DINO'),
    'bert': ('ssl_jax.methods.bert', 'BERT'),
    'gpt': ('ssl_jax.methods.gpt', 'GPT'),
    'finetune': ('ssl_jax.methods.finetune', 'FineTune'),
}


def method_class(config: ml_collections.ConfigDict) -> type[Method]:
  """The class of the method named by `config.method`."""
  if config.method not in METHODS:
    raise ConfigError(f'config.method={config.method!r} is not one of {sorted(METHODS)}')
  module_name, class_name = METHODS[config.method]
  return getattr(importlib.import_module(module_name), class_name)


def create(config: ml_collections.ConfigDict) -> Method:
  """Instantiates the method named by `config.method` with the resolved config."""
  return method_class(config)(config)


def load_encoder(directory: epath.PathLike, mesh: jax.sharding.Mesh | None = None
                 ) -> tuple[nnx.Module, Method]:
  """Rebuilds an exported encoder with its weights; also returns its method.

  The encoder is sharded by the exported config's logical-axis rules over
  `mesh` (default: every device on the data axis, i.e. replicated weights).
  """
  directory = epath.Path(directory)
  if not (directory / 'encoder').exists():
    raise FileNotFoundError(
        f'{directory} holds no exported encoder (expected {directory}/encoder).')
  config = checkpoint.load_config(directory / 'config.json')
  method = create(config)
  mesh = mesh or sharding.make_mesh(mesh_config())
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    abstract = nnx.eval_shape(lambda: method.build_encoder(nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    target = checkpoint.abstract_with_shardings(
        abstract_state, sharding.state_shardings(abstract_state, mesh))
    state = checkpoint.restore_export(directory, target)
  logging.info('Loaded %s encoder from %s', config.method, directory)
  return nnx.merge(graphdef, state), method
