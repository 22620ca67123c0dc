"""ResNet v1.5: sizes, torchvision numerics, BatchNorm in the pure train step, 8 devices vs 1.

The torchvision reference lives in tests/data/resnet_torchvision.npz: state-dict
names and shapes, and torchvision's float64 outputs for weights that
`fake_torchvision_weights` regenerates from a seed, so the test needs no torch.
Rebuild it (made with torch 2.14.1, torchvision 0.29.1, in a separate venv that
also has requirements.txt) with `PYTHONPATH=. python tests/test_resnet.py`.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from numpy.lib.stride_tricks import sliding_window_view

from ssl_jax import sharding, train
from ssl_jax.errors import ConfigError
from ssl_jax.methods.base import Method
from ssl_jax.models.resnet import (
  BN_EPSILON,
  BN_MOMENTUM,
  ResNet,
  from_torch_state_dict,
  torch_name,
)

FIXTURE = pathlib.Path(__file__).parent / 'data' / 'resnet_torchvision.npz'
SEED = 0


def one_device_mesh():
  return sharding.make_mesh(sharding.mesh_config(1, 1, 1), jax.devices()[:1])


def abstract(depth, **kwargs):
  """A ResNet's structure without arrays (no random init: it is slow on CPU)."""
  with sharding.activate(one_device_mesh(), sharding.DEFAULT_RULES):
    return nnx.eval_shape(lambda: ResNet(depth, rngs=nnx.Rngs(0), **kwargs))


# ------------------------------------------------------------------------------
# Sizes, shapes, annotations, initialisation.
# ------------------------------------------------------------------------------
@pytest.mark.parametrize('depth,params,stats,features', [
    (18, 11_176_512, 9_600, 512),     # torchvision resnet18: 11,689,512 - fc (512*1000 + 1000).
    (50, 23_508_032, 53_120, 2048),   # torchvision resnet50: 25,557,032 - fc (2048*1000 + 1000).
])
def test_sizes_match_torchvision_without_fc(depth, params, stats, features):
  model = abstract(depth)
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == params
  # running_mean + running_var of every BatchNorm (torch's num_batches_tracked aside).
  assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))) == stats
  assert model.num_features == features
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    names = variable.get_metadata().get('out_sharding')
    if path == ('stem_conv', 'kernel'):  # 3 colour channels: no mesh axis divides them.
      assert names == (None, None, None, 'conv_out')
    elif path[-1] == 'kernel':
      assert names == (None, None, 'conv_in', 'conv_out'), path
    else:
      assert names == ('conv_out',), path


@pytest.mark.parametrize('depth,stem,size,final,width_multiplier', [
    (18, 'cifar', 32, 4, 1), (18, 'imagenet', 32, 1, 1), (18, 'imagenet', 64, 2, 1),
    (50, 'cifar', 32, 4, 1), (50, 'imagenet', 64, 2, 1), (18, 'cifar', 16, 2, 0.25)])
def test_output_shapes(depth, stem, size, final, width_multiplier):
  model = abstract(depth, stem=stem, width_multiplier=width_multiplier, dtype=jnp.bfloat16)
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  out = nnx.eval_shape(lambda m, x: m(x, train=True), model, images)
  width = round((512 if depth == 18 else 2048) * width_multiplier)
  assert model.num_features == width
  assert out['feature_map'].shape == (2, final, final, width)
  assert out['pooled'].shape == (2, width) and out['pooled'].dtype == jnp.bfloat16
  # The CIFAR stem keeps full resolution (no stride, no max-pool); ImageNet's divides by 4.
  assert out['stem'].shape[1] == (size if stem == 'cifar' else size // 4)
  assert [out[f'stage{i}'].shape[1] for i in range(1, 5)] == [final * 8, final * 4, final * 2,
                                                              final]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_bad_arguments_say_what_was_wrong():
  with pytest.raises(ConfigError, match='depth must be one of'):
    abstract(20)
  with pytest.raises(ConfigError, match='stem must be one of'):
    abstract(18, stem='tiny')
  with pytest.raises(ConfigError, match='width_multiplier must be positive'):
    abstract(18, width_multiplier=0.3)  # 64 x 0.3 is no whole number of channels.
  with pytest.raises(ValueError, match=r'expects \(B, H, W, 3\)'):
    nnx.eval_shape(lambda m: m(jnp.zeros((2, 32, 32, 1)), train=False), abstract(18))


def test_initialisation_kaiming_fan_out_and_zero_init_residual():
  with sharding.activate(one_device_mesh(), sharding.DEFAULT_RULES):
    model = nnx.jit(lambda: ResNet(50, stage_sizes=(1, 1), stem='cifar',
                                   zero_init_residual=True, rngs=nnx.Rngs(0)))()
    identity_blocks = nnx.jit(lambda: ResNet(18, stage_sizes=(2,), stem='cifar',
                                             zero_init_residual=True, rngs=nnx.Rngs(1)))()
  # torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
  kernel = np.asarray(model.stages[1][0].conv2.kernel[...])  # (3, 3, 128, 128)
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / (3 * 3 * 128)), rtol=0.01)
  assert np.abs(kernel).max() > 3.5 * kernel.std()  # A truncated normal stops at 2 std.
  # Only the last BN of each block starts at gamma = 0 (torchvision, SimCLR's init_zero).
  for block in (model.stages[0][0], model.stages[1][0]):
    assert not np.any(block.bn3.scale[...])
    for norm in (block.bn1, block.bn2, block.shortcut.bn):
      np.testing.assert_array_equal(norm.scale[...], 1.0)
  # So a block without projection starts as the identity (its input is post-ReLU).
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  both_modes = nnx.jit(lambda m, x: (m(x, train=True), m(x, train=False)))
  for out in both_modes(identity_blocks, images):
    np.testing.assert_array_equal(out['stage1'], out['stem'])


# ------------------------------------------------------------------------------
# Against torchvision (fixture made by `write_fixture` below).
# ------------------------------------------------------------------------------
def fixture_images() -> np.ndarray:
  """(4, 32, 32, 3) float32 NHWC inputs of the torchvision fixture."""
  return np.random.default_rng(SEED).normal(size=(4, 32, 32, 3)).astype(np.float32)


def fake_torchvision_weights(names, shapes, seed: int) -> dict[str, np.ndarray]:
  """Random weights in torchvision's state-dict layout, BN statistics far from (0, 1)."""
  rng = np.random.default_rng(seed)
  weights = {}
  for name, shape in zip(names, shapes, strict=True):
    shape = tuple(int(d) for d in shape if d)  # Fixture shapes are zero-padded to 4 dims.
    if len(shape) == 4:  # (out, in, kh, kw), torchvision's kaiming fan_out init.
      value = rng.normal(0, np.sqrt(2 / (shape[0] * shape[2] * shape[3])), shape)
    elif name.endswith(('running_var', 'weight')):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # BN bias and running_mean.
      value = rng.normal(0, 0.1, shape)
    weights[str(name)] = value.astype(np.float32)
  return weights


def eval_train_and_stats(model: ResNet, images: np.ndarray):
  """Pooled features in eval and then train mode, and the running stats after, in one jit."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, images):
    model = nnx.merge(graphdef, state, copy=True)
    pooled_eval = model(images, train=False)['pooled']
    pooled_train = model(images, train=True)['pooled']
    return pooled_eval, pooled_train, nnx.state(model, nnx.BatchStat)

  return jax.device_get(run(state, jnp.asarray(images)))


@pytest.mark.parametrize('prefix,depth,stage_sizes', [
    ('resnet18', 18, None), ('bottleneck1111', 50, (1, 1, 1, 1))])
def test_matches_torchvision(prefix, depth, stage_sizes):
  reference = np.load(FIXTURE)
  names, shapes = reference[f'{prefix}_names'], reference[f'{prefix}_shapes']
  weights = fake_torchvision_weights(names, shapes, SEED)
  images = fixture_images()
  model = abstract(depth, stage_sizes=stage_sizes)
  with sharding.activate(one_device_mesh(), sharding.DEFAULT_RULES):
    from_torch_state_dict(model, weights)  # Fills the abstract model: no random init.
    pooled_eval, pooled_train, stats = eval_train_and_stats(model, images)
  # Float32 against torchvision in float64; torch's own float32 error is as large.
  np.testing.assert_allclose(pooled_eval, reference[f'{prefix}_eval'], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pooled_train, reference[f'{prefix}_train'], rtol=1e-3, atol=1e-3)
  if f'{prefix}_running' not in reference:
    return
  # Running averages after the train-mode pass. torch folds in the UNBIASED batch
  # variance, flax the biased one: torch's n / (n - 1) is undone per BN layer.
  running, start = {}, 0
  for key in reference[f'{prefix}_running_names']:  # One flat array, in state-dict order.
    running[key] = reference[f'{prefix}_running'][start:start + weights[key].size]
    start += weights[key].size
  counts = dict(zip(reference[f'{prefix}_bn_names'], reference[f'{prefix}_bn_counts'],
                    strict=True))
  biggest_correction = 0.0
  for path, variable in nnx.to_flat_state(stats):
    key = torch_name(path)
    ours, theirs, old = np.asarray(variable[...]), running[key], weights[key]
    if key.endswith('running_var'):
      n = counts[key.rsplit('.', 1)[0]]
      batch_unbiased = (theirs - BN_MOMENTUM * old) / (1 - BN_MOMENTUM)
      theirs = BN_MOMENTUM * old + (1 - BN_MOMENTUM) * batch_unbiased * (n - 1) / n
      biggest_correction = max(biggest_correction, np.abs(theirs - running[key]).max())
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5, err_msg=key)
  assert biggest_correction > 1e-3  # Layer4 BN sees n = 4 values: the correction matters.


def test_torch_state_dict_must_fit():
  names = np.load(FIXTURE)['resnet18_names']
  shapes = np.load(FIXTURE)['resnet18_shapes']
  weights = fake_torchvision_weights(names, shapes, SEED)
  with sharding.activate(one_device_mesh(), sharding.DEFAULT_RULES):
    with pytest.raises(KeyError, match="no 'layer4.1.bn2.running_var'"):
      from_torch_state_dict(abstract(18),
                            {k: v for k, v in weights.items() if k != 'layer4.1.bn2.running_var'})
    with pytest.raises(ValueError, match='conv1.weight: torch shape'):
      from_torch_state_dict(abstract(18, stem='cifar'), weights)


# ------------------------------------------------------------------------------
# BatchNorm in the trainer's pure step; sync BN on 8 devices.
# ------------------------------------------------------------------------------
class TinyResNetMethod(Method):
  """A bottleneck ResNet with two stages under the real trainer; loss = mean(pooled^2)."""

  def build(self, rngs):
    return ResNet(50, stage_sizes=(1, 1), stem='cifar', rngs=rngs)

  def loss_fn(self, model, batch, rng, step):
    return jnp.mean(model(batch['image'], train=True)['pooled'] ** 2), {}

  def encoder(self, model):
    return model

  def build_encoder(self, rngs):
    return self.build(rngs)


def np_conv(x, kernel, stride=1):
  """NHWC conv with torch's padding k // 2, by explicit windows."""
  k = kernel.shape[0]
  x = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  windows = sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
  return np.einsum('bhwcij,ijco->bhwo', windows, kernel)


def numpy_forward(params, stats, images, train):
  """The tiny bottleneck ResNet in float64 NumPy; also returns each BN's batch stats."""
  batch_stats = {}

  def norm(x, path, p, s):
    if train:
      mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))  # Biased, as flax.
      batch_stats[path] = (mean, var)
    else:
      mean, var = s['mean'], s['var']
    return (x - mean) / np.sqrt(var + BN_EPSILON) * p['scale'] + p['bias']

  relu = lambda x: np.maximum(x, 0)
  x = relu(norm(np_conv(images, params['stem_conv']['kernel']), ('stem_bn',),
                params['stem_bn'], stats['stem_bn']))
  for stage in range(2):
    p, s, prefix, stride = params['stages'][stage][0], stats['stages'][stage][0], (
        'stages', stage, 0), 2 if stage else 1
    y = relu(norm(np_conv(x, p['conv1']['kernel']), (*prefix, 'bn1'), p['bn1'], s['bn1']))
    y = relu(norm(np_conv(y, p['conv2']['kernel'], stride), (*prefix, 'bn2'), p['bn2'],
                  s['bn2']))
    y = norm(np_conv(y, p['conv3']['kernel']), (*prefix, 'bn3'), p['bn3'], s['bn3'])
    shortcut = norm(np_conv(x, p['shortcut']['conv']['kernel'], stride),
                    (*prefix, 'shortcut', 'bn'), p['shortcut']['bn'], s['shortcut']['bn'])
    x = relu(y + shortcut)
  return x.mean(axis=(1, 2)), batch_stats


STEP_IMAGES = np.random.default_rng(1).normal(size=(8, 8, 8, 3)).astype(np.float32)


def host_copy(state):
  """Parameters and BatchNorm statistics of a train state as nested dicts of NumPy arrays."""
  return jax.device_get({'params': nnx.to_pure_dict(state['params']),
                         'stats': nnx.to_pure_dict(state['model_state'])})


def one_train_step(mesh):
  """Eval features, then one trainer step (SGD) on STEP_IMAGES; host copies of everything."""
  method = TinyResNetMethod(ml_collections.ConfigDict())
  tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, seed=0)
    state = train.init_train_state(method, tx, shardings, seed=0)
    batch = sharding.put_batch({'image': STEP_IMAGES}, mesh)

    @jax.jit
    def evaluate(params, model_state, images):
      model = nnx.merge(graphdef, params, model_state, copy=True)
      return model(images, train=False)['pooled'], nnx.state(model, nnx.BatchStat)

    pooled_eval, stats_after_eval = evaluate(state['params'], state['model_state'],
                                             batch['image'])
    before = host_copy(state)
    kernel_shard = state['params']['stages'][1][0]['conv2']['kernel'][...].sharding
    step = train.make_train_step(method, graphdef, tx, schedule, shardings, mesh)
    state, metrics = step(state, batch, jax.random.key(0))  # Donates the old state.
    after = host_copy(state)
  return dict(before=before, after=after, loss=float(metrics['loss']),
              pooled_eval=np.asarray(pooled_eval), kernel_shard=kernel_shard,
              stats_after_eval=jax.device_get(nnx.to_pure_dict(stats_after_eval)))


@functools.cache
def one_device_step():
  return one_train_step(one_device_mesh())


@pytest.mark.parametrize('mesh_shape', [(2, 2, 2), (4, 2, 1)],
                         ids=['data2-fsdp2-tensor2', 'data4-fsdp2'])
def test_train_step_updates_running_stats_and_sync_bn_on_8_devices(mesh_shape):
  images = STEP_IMAGES
  one = one_device_step()
  eight = one_train_step(sharding.make_mesh(sharding.mesh_config(*mesh_shape)))
  # The batch is split over data x fsdp (4 or all 8 devices: one image each), conv
  # output channels over tensor.
  tensor = mesh_shape[2]
  assert eight['kernel_shard'].shard_shape((3, 3, 128, 128)) == (3, 3, 128, 128 // tensor)

  params = jax.tree.map(np.float64, one['before']['params'])
  stats = jax.tree.map(np.float64, one['before']['stats'])
  # Eval mode: running averages (fresh: 0 and 1), no updates; the same on 8 devices.
  pooled, _ = numpy_forward(params, stats, images.astype(np.float64), train=False)
  np.testing.assert_allclose(one['pooled_eval'], pooled, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(eight['pooled_eval'], one['pooled_eval'], rtol=1e-6, atol=1e-7)
  for run in (one, eight):
    jax.tree.map(np.testing.assert_array_equal, run['stats_after_eval'], run['before']['stats'])

  # Train mode: batch statistics of the GLOBAL batch, folded into the running averages.
  pooled, batch_stats = numpy_forward(params, stats, images.astype(np.float64), train=True)
  np.testing.assert_allclose(one['loss'], np.mean(pooled ** 2), rtol=1e-5)
  np.testing.assert_allclose(eight['loss'], one['loss'], rtol=1e-6)
  assert len(batch_stats) == 9  # stem + 2 blocks x (3 + shortcut).
  for path, (batch_mean, batch_var) in batch_stats.items():
    old, new_1, new_8 = (_at(r, path) for r in (one['before']['stats'], one['after']['stats'],
                                                eight['after']['stats']))
    for name, batch_value in (('mean', batch_mean), ('var', batch_var)):
      expected = BN_MOMENTUM * old[name] + (1 - BN_MOMENTUM) * batch_value
      assert np.abs(new_1[name] - old[name]).max() > 1e-3, (path, name)  # It did change.
      np.testing.assert_allclose(new_1[name], expected, rtol=1e-5, atol=1e-6,
                                 err_msg=f'{path} {name}')
      np.testing.assert_allclose(new_8[name], new_1[name], rtol=1e-5, atol=1e-7,
                                 err_msg=f'{path} {name} (8 devices)')
  # And the parameters took the same SGD step.
  for p8, p1 in zip(jax.tree.leaves(eight['after']['params']),
                    jax.tree.leaves(one['after']['params']), strict=True):
    np.testing.assert_allclose(p8, p1, rtol=1e-5, atol=1e-6)


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


# ------------------------------------------------------------------------------
# Rebuilding the fixture (needs torch + torchvision; not part of the test run).
# ------------------------------------------------------------------------------
def write_fixture(path: pathlib.Path = FIXTURE) -> None:
  """torchvision's float64 outputs for `fake_torchvision_weights` on `fixture_images`."""
  import torch
  import torchvision

  arrays = {}
  models = {'resnet18': torchvision.models.resnet18(),
            'bottleneck1111': torchvision.models.resnet.ResNet(
                torchvision.models.resnet.Bottleneck, [1, 1, 1, 1])}
  for prefix, model in models.items():
    model.fc = torch.nn.Identity()
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith('fc.') and not k.endswith('num_batches_tracked')}
    names = list(state)
    shapes = np.array([list(v.shape) + [0] * (4 - v.dim()) for v in state.values()])
    weights = fake_torchvision_weights(names, shapes, SEED)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    model = model.double()
    counts = {}
    for name, module in model.named_modules():
      if isinstance(module, torch.nn.BatchNorm2d):  # n = values per channel BN averages.
        module.register_forward_hook(
            lambda mod, inputs, out, name=name, counts=counts: counts.__setitem__(
                name, inputs[0].numel() // inputs[0].shape[1]))
    images = torch.from_numpy(fixture_images().transpose(0, 3, 1, 2)).double()
    with torch.no_grad():
      arrays[f'{prefix}_eval'] = model.eval()(images).numpy().astype(np.float32)
      arrays[f'{prefix}_train'] = model.train()(images).numpy().astype(np.float32)
    arrays[f'{prefix}_names'] = np.array(names)
    arrays[f'{prefix}_shapes'] = shapes
    if prefix == 'resnet18':  # Running statistics for one model keep the file small.
      running = {k: v.numpy().astype(np.float32) for k, v in model.state_dict().items()
                 if 'running_' in k}
      arrays[f'{prefix}_running_names'] = np.array(list(running))
      arrays[f'{prefix}_running'] = np.concatenate(list(running.values()))
      arrays[f'{prefix}_bn_names'] = np.array(list(counts))
      arrays[f'{prefix}_bn_counts'] = np.array(list(counts.values()))
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **arrays)
  print(f'wrote {path} ({path.stat().st_size} bytes)')


if __name__ == '__main__':
  write_fixture()
