"""k micro-batches accumulated in one step equal one step of the whole batch.

GPT and BERT on the padded, unevenly masked batches of test_text_methods
(their micro-batches count different numbers of targets: `loss_weight`),
and MAE with masks drawn per example, so that they do not depend on how
the batch is cut (the trainer gives each micro-batch its own rng, which
would draw other masks than one step of the whole batch). SGD, float32.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from configs import mae_vit, simclr_resnet
from ssl_jax import losses, methods, sharding, train
from ssl_jax.errors import ConfigError
from ssl_jax.methods.mae import MAE
from ssl_jax.train_step import check_grad_accum, make_train_step
from tests import runner, test_text_methods

BATCH = 16


class PerExampleMaskMAE(MAE):
  """MAE whose masking noise is a function of each example's label (its index here)."""

  def loss_fn(self, model, batch, rng, step):
    del rng, step
    images = self._normalize(batch['image'])
    patches = (images.shape[1] // self.config.model.patch_size) ** 2
    noise = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(jax.random.key(3), i),
                                                  (patches,)))(batch['label'])
    pred, mask = model(images, None, self.config.model.mask_ratio, noise=noise)
    target = losses.patchify(images, self.config.model.patch_size)
    return losses.mae_loss(pred, target, mask, self.config.model.norm_pix_loss), {
        'mask_fraction': mask.mean()}


def mae_config(mesh_shape):
  config = mae_vit.get_config('local')
  config.data.batch_size = BATCH
  config.model.update(dict(width=32, depth=2, num_heads=4, mlp_dim=64, decoder_width=32,
                           decoder_depth=1, decoder_heads=4, decoder_mlp_dim=64))
  config.optim.update(dict(name='sgd', schedule='constant', lr=0.1, weight_decay=0.05))
  config.mesh.update(mesh_shape)
  return train.resolve_config(config, num_train_examples=1437)


def mae_batch(seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {'image': rng.integers(0, 256, (BATCH, 16, 16, 1), np.uint8),
          'label': np.arange(BATCH, dtype=np.int32) + 100 * seed}


def config_of(kind: str, mesh_shape):
  if kind == 'mae':
    return mae_config(mesh_shape)
  config = test_text_methods.tiny_config(kind, mesh_shape)
  config.optim.update(dict(name='sgd', weight_decay=0.05))
  return config


def batch_of(kind: str, seed: int):
  return mae_batch(seed) if kind == 'mae' else test_text_methods.random_batch(kind, seed)


def run_steps(kind: str, grad_accum_steps: int, devices, mesh_shape, num_steps=2):
  """Losses of `num_steps` accumulated steps and the final parameters, as host arrays."""
  config = config_of(kind, mesh_shape)
  method = PerExampleMaskMAE(config) if kind == 'mae' else methods.create(config)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  schedule, tx = train.build_optimizer(config)
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, config.seed)
    state = train.init_train_state(method, tx, shardings, config.seed)
    step_fn = make_train_step(method, graphdef, tx, schedule, shardings, mesh,
                              grad_accum_steps=grad_accum_steps)
    step_losses = []
    for i in range(num_steps):
      state, metrics = step_fn(state, sharding.put_batch(batch_of(kind, i), mesh),
                               jax.random.key(7))
      step_losses.append(float(metrics['loss']))
    params = jax.device_get(nnx.to_pure_dict(state['params']))
  return np.array(step_losses), params


ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)


@functools.cache
def whole_batch_run(kind: str):
  return run_steps(kind, 1, jax.devices()[:1], ONE_DEVICE)


@pytest.mark.parametrize('kind,k,mesh_shape', [
    ('mae', 2, ONE_DEVICE), pytest.param('mae', 4, ONE_DEVICE, marks=pytest.mark.slow),
    ('gpt', 2, ONE_DEVICE), pytest.param('gpt', 4, ONE_DEVICE, marks=pytest.mark.slow),
    pytest.param('bert', 4, ONE_DEVICE, marks=pytest.mark.slow),
    ('gpt', 2, dict(data=4, fsdp=2, tensor=1)),  # Micro-batches of 8 over all 8 devices.
], ids=['mae-k2', 'mae-k4', 'gpt-k2', 'gpt-k4', 'bert-k4', 'gpt-k2-data4-fsdp2'])
def test_accumulated_steps_equal_the_whole_batch(kind, k, mesh_shape):
  want_losses, want_params = whole_batch_run(kind)
  devices = jax.devices()[:1] if mesh_shape == ONE_DEVICE else jax.devices()
  got_losses, got_params = run_steps(kind, k, devices, mesh_shape)
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  assert want_losses[1] != want_losses[0]  # The first step really changed the parameters.
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), got_params,
                                       want_params))
  print(f'{kind} k={k}: losses {got_losses} vs {want_losses}; '
        f'max abs param diff {max(diffs):.2e}')
  for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(want_params)[0],
                               jax.tree.leaves(got_params), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_accumulation_is_refused_where_it_would_change_the_objective():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))  # 8 devices.
  config = simclr_resnet.get_config('local')
  config.train.grad_accum_steps = 2
  with pytest.raises(ConfigError, match='simclr cannot accumulate gradients exactly: NT-Xent'):
    check_grad_accum(config, methods.method_class(config), mesh)
  config = mae_vit.get_config('local')  # Batch 128.
  config.train.grad_accum_steps = 32
  with pytest.raises(ConfigError, match=r'batch_size=128 must be divisible by train.grad_accum'
                     r'_steps \(32\) x the batch-sharding devices \(mesh data x fsdp = 8\)'):
    check_grad_accum(config, methods.method_class(config), mesh)
  config.train.grad_accum_steps = 16
  check_grad_accum(config, methods.method_class(config), mesh)
  config.train.grad_accum_steps = 0
  with pytest.raises(ConfigError, match='expected an integer >= 1'):
    check_grad_accum(config, methods.method_class(config), mesh)


@pytest.mark.slow
def test_accumulation_from_the_command_line(tmp_path):
  refused = runner.run_main(tmp_path / 'simclr', '--config.train.grad_accum_steps=2',
                            config='configs/simclr_resnet.py:local')
  assert refused.returncode == 1
  assert 'error: config.train.grad_accum_steps=2: simclr cannot accumulate' in refused.stderr
  assert not (tmp_path / 'simclr' / 'checkpoints').exists()  # Refused before any work.
  done = runner.run_main(tmp_path / 'mae', *runner.TINY, '--config.train.steps=6',
                         '--config.train.grad_accum_steps=4')
  assert done.returncode == 0, done.stdout + done.stderr
  logged = [r for r in runner.read_metrics(tmp_path / 'mae') if 'loss' in r]
  assert [r['step'] for r in logged] == list(range(1, 7))
  assert all(np.isfinite(r['loss']) and r['nonfinite_steps'] == 0 for r in logged)
