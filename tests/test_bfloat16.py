"""`model.dtype=bfloat16`: every method computes in bfloat16 and keeps float32 master weights.

Each method's tiny :local model is built with bfloat16 compute; its
parameters (and Adam's moments) must all be float32, its encoder's main
activation bfloat16, and one real train step (`train_step.make_train_step`,
on a random batch shaped as the method's data) must give a finite float32
loss and float32 updated parameters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import bert_mlm, dino_vit, gpt, mae_vit, simclr_resnet
from ssl_jax import methods, sharding, train
from ssl_jax.dry_run import abstract_batch, dry_config
from ssl_jax.models.resnet import ResNet
from ssl_jax.train_step import make_train_step

# Each :local recipe cut to one or two blocks and a small batch; compute in bfloat16.
TINY = {
    'mae': (mae_vit, {'model.depth': 1, 'model.decoder_depth': 1, 'data.batch_size': 8}),
    'simclr': (simclr_resnet, {'data.batch_size': 8}),
    'dino': (dino_vit, {'model.depth': 1, 'data.batch_size': 8, 'augment.num_local_crops': 2}),
    'gpt': (gpt, {'model.depth': 1, 'data.batch_size': 4, 'data.seq_len': 16,
                  'data.vocab_size': 64}),
    'bert': (bert_mlm, {'model.depth': 1, 'data.batch_size': 4, 'data.seq_len': 16,
                        'data.vocab_size': 64}),
}


def random_batch(config, spec, mesh):
  """Random values of the shapes and dtypes the method's data would have."""
  rng = np.random.default_rng(0)
  vocab = config.model.get('vocab_size') or 1
  batch = {}
  for name, shape in abstract_batch(config, spec, mesh).items():
    if shape.dtype == jnp.uint8:
      batch[name] = rng.integers(0, 256, shape.shape, np.uint8)
    elif name in ('tokens', 'inputs', 'labels') and spec.kind == 'text':
      batch[name] = rng.integers(4, vocab, shape.shape).astype(np.int32)
    elif name == 'weights':
      batch[name] = (rng.random(shape.shape) < 0.5).astype(np.float32)
    else:  # label, token_types: zeros; key_mask: every key.
      batch[name] = np.zeros(shape.shape, shape.dtype) if shape.dtype != jnp.bool_ else np.ones(
          shape.shape, bool)
  return sharding.put_batch(batch, mesh)


def encoder_activation(method, model, batch):
  """The encoder's main output on `batch`: ViT tokens, ResNet pooled features, LM hidden."""
  encoder = method.encoder(model)
  if 'tokens' in batch or 'inputs' in batch:
    return encoder(batch.get('tokens', batch.get('inputs')))['hidden']
  images = next(v for k, v in batch.items() if k != 'label')
  images = images.reshape(-1, *images.shape[-3:])[:2].astype(jnp.float32) / 255
  if isinstance(encoder, ResNet):
    return encoder(images, train=False)['pooled']
  return encoder(images)['tokens']


# SimCLR's and DINO's (the slowest to compile) are in the slow selection.
@pytest.mark.parametrize('name', [
    pytest.param(name, marks=pytest.mark.slow) if name in ('simclr', 'dino') else name
    for name in TINY])
def test_bfloat16_compute_with_float32_master_weights(name):
  module, settings = TINY[name]
  config = module.get_config('local')
  config.update_from_flattened_dict({**settings, 'model.dtype': 'bfloat16'})
  method_class = methods.method_class(config)
  spec = method_class.data_spec(config)
  config = dry_config(config, spec)
  method = method_class(config)
  schedule, tx = train.build_optimizer(config)
  mesh = sharding.make_mesh(sharding.mesh_config(1, 1, 1), jax.devices()[:1])
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, config.seed)
    state = train.init_train_state(method, tx, shardings, config.seed)
    float_leaves = [x for x in jax.tree.leaves((state['params'], state['opt_state']))
                    if jnp.issubdtype(x.dtype, jnp.floating)]
    assert float_leaves and {x.dtype for x in float_leaves} == {jnp.dtype(jnp.float32)}
    batch = random_batch(config, spec, mesh)
    model = nnx.merge(graphdef, state['params'], state['model_state'])
    assert encoder_activation(method, model, batch).dtype == jnp.bfloat16
    step = make_train_step(method, graphdef, tx, schedule, shardings, mesh)
    state, metrics = step(state, batch, jax.random.key(0))
  assert metrics['loss'].dtype == jnp.float32 and np.isfinite(float(metrics['loss']))
  assert int(metrics['nonfinite_steps']) == 0
  assert {x.dtype for x in jax.tree.leaves(state['params'])} == {jnp.dtype(jnp.float32)}
