"""Parameters and Adam moments really are sharded as the logical rules say, before and after a step.

On a (data 2, fsdp 2, tensor 2) mesh of 8 fake devices, with the default
rules (config_blocks.DEFAULT_RULES: embed -> fsdp, mlp / heads / vocab ->
tensor), the big kernels of a tiny GPT and a tiny MAE ViT, and their `mu`
and `nu`, must carry those mesh axes in `.sharding.spec`, and each device
must hold a quarter of them (`addressable_shards[0]`): ZeRO-3 over fsdp and
Megatron-style splits over tensor, not replicated copies.
"""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import gpt, mae_vit
from ssl_jax import methods, sharding, train
from ssl_jax.dry_run import dry_config
from ssl_jax.train_step import make_train_step
from tests.test_bfloat16 import random_batch

MESH = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
TINY = {
    'gpt': (gpt, {'model.depth': 1, 'model.width': 32, 'model.num_heads': 4,
                  'model.mlp_dim': 64, 'data.batch_size': 8, 'data.seq_len': 16,
                  'data.vocab_size': 64, 'model.dtype': 'float32'}),
    'mae': (mae_vit, {'model.depth': 1, 'model.width': 32, 'model.num_heads': 4,
                      'model.mlp_dim': 64, 'model.decoder_depth': 1, 'data.batch_size': 8}),
}
# Path suffix -> (spec under the default rules, the divisors of each dimension per device).
EXPECTED = {
    'mlp/fc1/kernel': (P('fsdp', 'tensor'), (2, 2)),                    # (embed, mlp)
    'mlp/fc2/kernel': (P('tensor', 'fsdp'), (2, 2)),                    # (mlp, embed)
    'attn/qkv/kernel': (P('fsdp', None, 'tensor', None), (2, 1, 2, 1)),  # (embed, 3, heads, kv)
    'attn/proj/kernel': (P('tensor', None, 'fsdp'), (2, 1, 2)),          # (heads, kv, embed)
    'token_embed/embedding': (P('tensor', 'fsdp'), (2, 2)),             # (vocab, embed)
}


def flat(tree) -> dict[str, jax.Array]:
  """{'a/b/kernel': array} of an nnx.State (or any pytree) of arrays."""
  def name(key):
    return str(getattr(key, 'key', getattr(key, 'idx', getattr(key, 'name', key))))
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(name(k) for k in path if name(k) != 'value'): leaf for path, leaf in leaves}


def check_sharded(state) -> int:
  """Asserts every EXPECTED kernel and its mu and nu are sharded as the rules say; counts them."""
  params = flat(state['params'])
  moments = {key: flat(optax.tree_utils.tree_get(state['opt_state'], key))
             for key in ('mu', 'nu')}
  checked = 0
  for path, param in params.items():
    suffix = next((s for s in EXPECTED if path.endswith(s)), None)
    if suffix is None:
      continue
    spec, divisors = EXPECTED[suffix]
    want_shard = tuple(dim // d for dim, d in zip(param.shape, divisors, strict=True))
    for what, array in (('param', param), ('mu', moments['mu'][path]),
                        ('nu', moments['nu'][path])):
      assert array.sharding.spec == spec, f'{what} {path}: {array.sharding.spec} != {spec}'
      assert array.addressable_shards[0].data.shape == want_shard, f'{what} {path}'
      assert np.prod(want_shard) * 4 == np.prod(param.shape)  # A quarter on each device.
    checked += 1
  return checked


@pytest.mark.parametrize('name', list(TINY))
def test_params_and_adam_moments_are_sharded_by_the_rules(name):
  module, settings = TINY[name]
  config = module.get_config('local')
  config.update_from_flattened_dict({**settings, **MESH})
  method_class = methods.method_class(config)
  spec = method_class.data_spec(config)
  config = dry_config(config, spec)
  method = method_class(config)
  schedule, tx = train.build_optimizer(config)
  mesh = sharding.make_mesh(config.mesh)
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, config.seed)
    state = train.init_train_state(method, tx, shardings, config.seed)
    born = check_sharded(state)
    step = make_train_step(method, graphdef, tx, schedule, shardings, mesh)
    state, metrics = step(state, random_batch(config, spec, mesh), jax.random.key(0))
    assert np.isfinite(float(metrics['loss']))
    assert check_sharded(state) == born  # The step's outputs keep the shardings.
  # GPT: fc1, fc2, qkv, proj and the token embedding; MAE: encoder and decoder blocks.
  assert born == (5 if name == 'gpt' else 8)
