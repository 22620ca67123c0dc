"""One train step on 8 (fake CPU) devices equals the step on 1 device.

conftest.py gives the test session 8 CPU devices; the 1-device run uses a
mesh over the first device only (bitwise the same as a 1-device process,
see ../shared/STACK-probe-notes.md, section 2). For SimCLR this also checks
that BatchNorm statistics and NT-Xent negatives span the global batch.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from configs import dino_vit, mae_vit, simclr_resnet
from ssl_jax import methods, sharding, train

LR = 1e-2
BATCH = 16


def tiny_mae():
  config = mae_vit.get_config('local')
  config.model.update(dict(width=32, depth=2, num_heads=4, mlp_dim=64, decoder_width=32,
                           decoder_depth=1, decoder_heads=4, decoder_mlp_dim=64))
  return config


def tiny_simclr():
  config = simclr_resnet.get_config('local')
  config.model.update(dict(projection_hidden=32, projection_dim=16))
  return config


def tiny_dino():
  config = dino_vit.get_config('local')
  # drop_path_rate 0.5: the second block drops half its branches, with masks
  # that must not depend on how the batch is sharded.
  config.model.update(dict(width=32, depth=2, num_heads=4, mlp_dim=64, out_dim=64,
                           head_hidden_dim=32, head_bottleneck_dim=16, drop_path_rate=0.5))
  config.augment.num_local_crops = 2
  config.optim.freeze_steps = 0  # Freezing needs adamw; SGD keeps float noise small.
  return config


CONFIGS = {'mae': tiny_mae, 'simclr': tiny_simclr, 'dino': tiny_dino}


def tiny_config(method: str, optimizer: str, mesh_shape: dict):
  config = CONFIGS[method]()
  config.data.batch_size = BATCH
  # A constant lr: with warmup the first step's lr would be 0 and prove nothing.
  config.optim.update(dict(name=optimizer, schedule='constant', lr=LR, weight_decay=0.05))
  config.mesh.update(mesh_shape)
  return train.resolve_config(config, num_train_examples=1437)


def random_batch(method, config, rng) -> dict[str, np.ndarray]:
  """A host batch of random pixels in the method's layout: its views, or one image."""
  channels, specs = config.data.channels, method.view_specs(method.config)
  shapes = ({spec.name: (BATCH, spec.count, spec.size, spec.size, channels) for spec in specs}
            if specs else {'image': (BATCH, config.data.image_size, config.data.image_size,
                                     channels)})
  batch = {name: rng.integers(0, 256, shape, np.uint8) for name, shape in shapes.items()}
  return batch | {'label': rng.integers(0, 10, BATCH, np.int32)}


def run_steps(config, devices, num_steps=2):
  """Losses of `num_steps` steps and the final variables, as host arrays."""
  method = methods.create(config)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  schedule, tx = train.build_optimizer(config)
  rng = np.random.default_rng(0)
  batches = [random_batch(method, config, rng) for _ in range(num_steps)]
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, config.seed)
    state = train.init_train_state(method, tx, shardings, config.seed)
    step_fn = train.make_train_step(method, graphdef, tx, schedule, shardings, mesh)
    losses = []
    for i in range(num_steps):
      batch = sharding.put_batch(batches[i], mesh)
      state, metrics = step_fn(state, batch, jax.random.key(7))
      losses.append(float(metrics['loss']))
    variables = jax.device_get({'params': nnx.to_pure_dict(state['params']),
                                'model_state': nnx.to_pure_dict(state['model_state'])})
    shard_shapes = jax.tree.map(lambda x: x.sharding.shard_shape(x.shape),
                                nnx.to_pure_dict(state['params']))
  return np.array(losses), variables, shard_shapes


def zero_gradient(path) -> bool:
  # Softmax ignores a constant added to every logit, so the key bias gets no
  # gradient; Adam turns float noise there into updates of size ~lr.
  names = [getattr(p, 'key', getattr(p, 'idx', None)) for p in path]
  return 'qkv' in names and 'bias' in names


@functools.cache
def one_device_run(method: str, optimizer: str):
  config = tiny_config(method, optimizer, dict(data=1, fsdp=1, tensor=1))
  return run_steps(config, jax.devices()[:1])


@pytest.mark.parametrize('method,optimizer,mesh_shape', [
    ('mae', 'sgd', dict(data=8, fsdp=1, tensor=1)),
    ('mae', 'sgd', dict(data=1, fsdp=8, tensor=1)),
    ('mae', 'sgd', dict(data=2, fsdp=2, tensor=2)),
    ('mae', 'adamw', dict(data=2, fsdp=4, tensor=1)),
    # Batch (and BN) over all 8; 55 s of ResNet compiles: in the slow selection.
    pytest.param('simclr', 'lars', dict(data=4, fsdp=2, tensor=1), marks=pytest.mark.slow),
    # Center, teacher EMA, out_dim split; 44 s: in the slow selection.
    pytest.param('dino', 'sgd', dict(data=2, fsdp=2, tensor=2), marks=pytest.mark.slow),
], ids=['mae-sgd-data8', 'mae-sgd-fsdp8', 'mae-sgd-data2-fsdp2-tensor2', 'mae-adamw-data2-fsdp4',
        'simclr-lars-data4-fsdp2', 'dino-sgd-data2-fsdp2-tensor2'])
def test_eight_devices_match_one(method, optimizer, mesh_shape):
  losses_1, variables_1, _ = one_device_run(method, optimizer)
  config = tiny_config(method, optimizer, mesh_shape)
  losses_8, variables_8, shard_shapes_8 = run_steps(config, jax.devices())
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5, atol=1e-6)
  assert losses_1[1] != losses_1[0]  # The first step really changed the parameters.
  flat_1 = jax.tree_util.tree_flatten_with_path(variables_1)[0]
  flat_8 = jax.tree.leaves(variables_8)
  for (path, v1), v8 in zip(flat_1, flat_8, strict=True):
    # Adam turns float noise in a zero gradient into an update of up to lr per step.
    atol = 2 * LR if optimizer == 'adamw' and zero_gradient(path) else 1e-5
    np.testing.assert_allclose(v8, v1, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))
  if method == 'simclr':  # BatchNorm statistics were updated, identically on 8 devices.
    stats = variables_8['model_state']['encoder']['stem_bn']['mean']
    assert np.abs(stats).max() > 0
  elif method == 'dino':  # The center moved (global batch mean), identically on 8 devices.
    assert np.abs(variables_8['model_state']['center']).max() > 0
    last_layer = shard_shapes_8['student']['head']['last_layer']['kernel']
    assert last_layer == (16 // mesh_shape['fsdp'], 64 // mesh_shape['tensor'])
  else:  # The parameters really were sharded the way the mesh asks.
    kernel_shard = shard_shapes_8['encoder']['encoder']['blocks'][0]['mlp']['fc1']['kernel']
    assert kernel_shard == (32 // mesh_shape['fsdp'], 64 // mesh_shape['tensor'])
