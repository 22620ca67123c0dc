"""Fine-tuning: layer-wise lr decay, mixup / cutmix / smoothing, a CLI run that learns, resume."""

import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import finetune as finetune_config
from configs import mae_vit
from ssl_jax import config_blocks, optim, train
from ssl_jax.methods import finetune
from ssl_jax.models.vit import ViT
from tests import runner, test_sharded_step
from tests.test_resume import checkpoint_steps, wait_for_step

DEPTH = 3


def small_model():
  """A depth-3 ViT with fc_norm and head: the tree `finetune` optimises."""
  with nnx.use_eager_sharding(False):
    vit = ViT(patch_size=4, channels=1, width=8, depth=DEPTH, num_heads=2, mlp_dim=16,
              rngs=nnx.Rngs(0))
    return finetune.FineTuneModel(vit, 5, global_pool=True, head_init_std=2e-5,
                                  rngs=nnx.Rngs(1))


def timm_names(params) -> dict[str, str]:
  """Our path -> the timm ViT parameter name it holds (models_vit.py / timm)."""
  names = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(getattr(k, 'key', '')) for k in path if hasattr(k, 'key')]
    ours = '/'.join(keys)
    if keys[0] == 'encoder' and keys[1] == 'encoder':  # The ViT's Transformer.
      keys = keys[2:]
    elif keys[0] == 'encoder':
      keys = keys[1:]
    names[ours] = '.'.join(keys)
  return names


def param_groups_lrd_scales(names: list[str], layer_decay: float) -> dict[str, float]:
  """mae util/lr_decay.py param_groups_lrd + get_layer_id_for_vit, on timm names."""
  num_layers = DEPTH + 1
  layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]

  def layer_id(name):
    if name in ['cls_token', 'pos_embed']:
      return 0
    if name.startswith('patch_embed'):
      return 0
    if name.startswith('blocks'):
      return int(name.split('.')[1]) + 1
    return num_layers
  return {name: layer_scales[layer_id(name)] for name in names}


def flat(tree) -> dict[str, np.ndarray]:
  return {'/'.join(str(getattr(k, 'key', '')) for k in path if hasattr(k, 'key')): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_layer_decay_scales_and_decay_mask_match_param_groups_lrd():
  _, params, _ = nnx.split(small_model(), nnx.Param, ...)
  names = timm_names(params)
  want = param_groups_lrd_scales(list(names.values()), 0.65)
  got = flat(optim.layer_decay_scales(params, 0.65))
  assert got.keys() == names.keys()
  for ours, timm in names.items():
    np.testing.assert_allclose(got[ours], want[timm], rtol=1e-12, err_msg=f'{ours} ({timm})')
  assert got['head/kernel'] == 1.0 and np.isclose(got['encoder/cls_token'], 0.65 ** 4)
  # lr_decay.py L32: no decay for 1-D parameters (in torch: biases, norms) and
  # no_weight_decay() = {pos_embed, cls_token}; everything else is decayed.
  mask = flat(optim.finetune_decay_mask(params))
  for ours, timm in names.items():
    one_dimensional_in_torch = timm.endswith(('bias', 'scale'))
    assert bool(mask[ours]) == (not one_dimensional_in_torch and timm != 'cls_token'), timm


def test_layer_decay_scales_the_whole_adamw_update():
  """Each group's lr (and so its decoupled decay) times its scale, as lr_sched.py sets it."""
  _, params, _ = nnx.split(small_model(), nnx.Param, ...)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  config = config_blocks.optim_config(weight_decay=0.05, layer_decay=0.65)
  decayed = optim.build_optimizer(config, optax.constant_schedule(0.1))
  plain = optax.adamw(0.1, weight_decay=0.05, mask=optim.finetune_decay_mask)
  got, _ = decayed.update(grads, decayed.init(params), params)
  want, _ = plain.update(grads, plain.init(params), params)
  scales = flat(optim.layer_decay_scales(params, 0.65))
  got, want = flat(got), flat(want)
  for name, scale in scales.items():
    np.testing.assert_allclose(got[name], want[name] * scale, rtol=1e-6, err_msg=name)
  with pytest.raises(Exception, match='layer_decay is implemented for adamw'):
    optim.build_optimizer(config_blocks.optim_config(name='sgd', layer_decay=0.65),
                          optax.constant_schedule(0.1))


@pytest.mark.parametrize('global_pool', [True, False])
def test_head_reads_the_pooled_patches_through_fc_norm_or_the_normed_cls(global_pool):
  """models_vit.py L46-51: global pool skips the encoder's last norm; [CLS] goes through it."""
  with nnx.use_eager_sharding(False):
    vit = ViT(patch_size=4, channels=1, width=8, depth=1, num_heads=2, mlp_dim=16,
              rngs=nnx.Rngs(0))
    model = finetune.FineTuneModel(vit, 5, global_pool=global_pool, head_init_std=2e-5,
                                   rngs=nnx.Rngs(1))
  kernel = np.asarray(model.head.kernel[...])
  assert 1e-5 < kernel.std() < 3e-5 and not np.asarray(model.head.bias[...]).any()
  model.head.kernel[...] = jax.random.normal(jax.random.key(2), kernel.shape)
  images = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
  tokens = vit(images, final_norm=False)['tokens']
  if global_pool:
    want = model.head(model.fc_norm(tokens[:, 1:].mean(axis=1)))
  else:
    want = model.head(vit.encoder.norm(tokens)[:, 0])
  np.testing.assert_allclose(model(images), want, rtol=1e-5, atol=1e-6)
  vit.encoder.norm.scale[...] = 2.0 * vit.encoder.norm.scale[...]  # Moves only the [CLS] path.
  assert np.allclose(model(images), want, atol=1e-6) == global_pool


def numpy_timm_mixup(images, labels, lam, use_cutmix, box, num_classes, smoothing):
  """timm Mixup._mix_batch + mixup_target, in NumPy (NHWC), with a given lam and box."""
  x = images.copy()
  if use_cutmix:
    top, bottom, left, right = box
    x[:, top:bottom, left:right] = images[::-1][:, top:bottom, left:right]
  else:
    x = images * lam + images[::-1] * (1 - lam)
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  y1 = np.full((len(labels), num_classes), off)
  y1[np.arange(len(labels)), labels] = on
  return x, y1 * lam + y1[::-1] * (1 - lam)


def numpy_soft_target_ce(logits, targets):
  logits = logits - logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return float((-targets * log_probs).sum(-1).mean())


def test_mixup_cutmix_and_smoothing_match_timm_in_numpy():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(6, 8, 8, 2)).astype(np.float32)
  labels = rng.integers(0, 4, 6)
  logits = rng.normal(size=(6, 4)).astype(np.float32)
  seen = set()
  for seed in range(40):
    params = finetune.mixing_params(jax.random.key(seed), 8, 8, mixup_alpha=0.8,
                                    cutmix_alpha=1.0)
    lam, use_cutmix = float(params['lam']), bool(params['use_cutmix'])
    top, bottom, left, right = (int(v) for v in params['box'])
    if use_cutmix:  # correct_lam: lam is the share outside the (clipped) box.
      assert np.isclose(lam, 1 - (bottom - top) * (right - left) / 64)
    seen.add(use_cutmix)
    mixed, targets = finetune.mix_batch(jnp.asarray(images), jnp.asarray(labels), params, 4, 0.1)
    want_x, want_y = numpy_timm_mixup(images, labels, lam, use_cutmix,
                                      (top, bottom, left, right), 4, 0.1)
    np.testing.assert_allclose(mixed, want_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(targets, want_y, rtol=1e-6)
    np.testing.assert_allclose(finetune.soft_target_cross_entropy(jnp.asarray(logits), targets),
                               numpy_soft_target_ce(logits, want_y), rtol=1e-5)
  assert seen == {True, False}  # switch_prob 0.5: both kinds in 40 draws.
  # No mixing: the soft-target loss is timm's LabelSmoothingCrossEntropy.
  params = finetune.mixing_params(jax.random.key(0), 8, 8, mixup_alpha=0.0, cutmix_alpha=0.0)
  mixed, targets = finetune.mix_batch(jnp.asarray(images), jnp.asarray(labels), params, 4, 0.1)
  np.testing.assert_array_equal(mixed, images)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs = log_probs - np.log(np.exp(log_probs).sum(-1, keepdims=True))
  nll = -log_probs[np.arange(6), labels].mean()
  smoothed = 0.9 * nll + 0.1 * (-log_probs.mean(-1)).mean()
  np.testing.assert_allclose(finetune.soft_target_cross_entropy(jnp.asarray(logits), targets),
                             smoothed, rtol=1e-5)


# -------------------------------------------------------------- 8 devices ---
def shape_only_export(directory):
  """An export's config.json (a depth-2 MAE ViT) and an empty encoder/: enough to build."""
  config = mae_vit.get_config('local')
  config.model.update(dict(width=32, depth=2, num_heads=4, mlp_dim=64))
  (directory / 'encoder').mkdir(parents=True)
  (directory / 'config.json').write_text(config.to_json_best_effort())
  return directory


def test_eight_devices_match_one_with_mixing_drop_path_and_layer_decay(tmp_path):
  """The batch flip of mixup / cutmix crosses shards; drop path masks must not depend on them."""
  def config_for(mesh_shape):
    config = finetune_config.get_config('local')
    config.model.update(dict(encoder_from=str(shape_only_export_dir), drop_path_rate=0.5))
    config.augment.update(dict(mixup=0.8, cutmix=1.0))  # The recipe's; :local turns them off.
    config.data.batch_size = test_sharded_step.BATCH
    config.optim.update(dict(schedule='constant', lr=test_sharded_step.LR))
    config.mesh.update(mesh_shape)
    return train.resolve_config(config, num_train_examples=1437)

  shape_only_export_dir = shape_only_export(tmp_path / 'export')
  losses_1, variables_1, _ = test_sharded_step.run_steps(
      config_for(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])
  losses_8, variables_8, _ = test_sharded_step.run_steps(
      config_for(dict(data=2, fsdp=2, tensor=2)), jax.devices())
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5, atol=1e-6)
  assert losses_1[1] != losses_1[0]
  flat_1 = jax.tree_util.tree_flatten_with_path(variables_1)[0]
  for (path, v1), v8 in zip(flat_1, jax.tree.leaves(variables_8), strict=True):
    atol = 2 * test_sharded_step.LR if test_sharded_step.zero_gradient(path) else 1e-5
    np.testing.assert_allclose(v8, v1, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_resnet_export_gets_a_zero_head_on_its_pooled_features(tmp_path):
  """SimCLR's fine-tuning: the ResNet's pooled features -> a zero-init head (README L158).

  BatchNorm uses batch statistics (and moves its running averages) in the
  loss, the running averages in `classify`, which equals the head on the
  method's `features`.
  """
  from configs import simclr_resnet
  source = simclr_resnet.get_config('local')
  source.model.width_multiplier = 0.125
  (tmp_path / 'export' / 'encoder').mkdir(parents=True)
  (tmp_path / 'export' / 'config.json').write_text(source.to_json_best_effort())
  config = finetune_config.get_config('resnet_local')
  config.model.encoder_from = str(tmp_path / 'export')
  method = finetune.FineTune(train.resolve_config(config, num_train_examples=1437))
  with nnx.use_eager_sharding(False):
    model = method.build(nnx.Rngs(0))
  assert model.resnet and not model.global_pool and model.head.kernel[...].shape == (64, 10)
  assert not np.any(model.head.kernel[...])
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (6, 8, 8, 1)), jnp.uint8)
  labels = jnp.arange(6) % 10
  before = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))
  loss, metrics = method.loss_fn(model, {'image': images, 'label': labels}, jax.random.key(0),
                                 jnp.asarray(0))
  np.testing.assert_allclose(loss, np.log(10), rtol=1e-6)  # Zero logits, no mixing.
  assert float(metrics['mix_lam']) == 1.0
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), before, nnx.state(model, nnx.BatchStat))
  assert any(jax.tree.leaves(moved))
  model.head.kernel[...] = jax.random.normal(jax.random.key(1), (64, 10))
  np.testing.assert_allclose(method.classify(model, images),
                             model.head(method.features(model.encoder, images)), atol=1e-5)


# ------------------------------------------------------------- end to end ---
FINETUNE = 'configs/finetune.py:local'
TINY_FT = ('--config.data.batch_size=32', '--config.train.log_every=1',
           '--config.train.checkpoint_every=1000')


@pytest.fixture(scope='module')
def tiny_export(tmp_path_factory):
  """The export of a 30-step tiny MAE run."""
  workdir = tmp_path_factory.mktemp('mae')
  done = runner.run_main(workdir, *runner.TINY, '--config.train.steps=30',
                         '--config.eval.linear_probe.enabled=False',
                         '--config.eval.random_init_baseline=False')
  assert done.returncode == 0, done.stdout + done.stderr
  return workdir / 'export'


def finetune_top1(workdir) -> float:
  return [r for r in runner.read_metrics(workdir) if 'probe_top1' in r][-1]['probe_top1']


@pytest.mark.slow
def test_finetune_of_an_export_learns(tiny_export, tmp_path):
  """The CLI fine-tunes the export (top-1 far above chance); encoder_from alone starts fresh."""
  steps = ('--config.train.steps=600', '--config.optim.lr=4e-3')
  tuned = runner.run_main(tmp_path / 'tuned', *TINY_FT, *steps,
                          f'--config.train.init_from={tiny_export}', config=FINETUNE)
  assert tuned.returncode == 0, tuned.stdout + tuned.stderr
  assert 'Initialised the weights from the exported encoder' in tuned.stdout
  assert 'fine-tuned classifier top-1 on digits:test' in tuned.stdout
  losses = [r['loss'] for r in runner.read_metrics(tmp_path / 'tuned') if 'loss' in r]
  assert np.mean(losses[-50:]) < np.mean(losses[:50]) - 0.3
  assert finetune_top1(tmp_path / 'tuned') > 0.6  # Chance is 0.1; measured 0.81.
  scratch = runner.run_main(tmp_path / 'scratch', *TINY_FT, '--config.train.steps=2',
                            '--config.optim.warmup_steps=0',
                            f'--config.model.encoder_from={tiny_export}', config=FINETUNE)
  assert scratch.returncode == 0, scratch.stdout + scratch.stderr
  assert 'Initialised the weights' not in scratch.stdout
  missing = runner.run_main(tmp_path / 'missing', config=FINETUNE)
  assert missing.returncode != 0 and 'set config.train.init_from' in missing.stderr


@pytest.mark.slow
def test_finetune_resumes_exactly_after_a_kill(tiny_export, tmp_path):
  """Killed between checkpoints and rerun: the same state and losses as an uninterrupted run."""
  args = (*TINY_FT, '--config.train.steps=200', '--config.train.checkpoint_every=50',
          f'--config.train.init_from={tiny_export}', '--config.eval.online_probe.enabled=False')
  straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
  done = runner.run_main(straight, *args, config=FINETUNE)
  assert done.returncode == 0, done.stdout + done.stderr
  process = subprocess.Popen(runner.main_command(interrupted, *args, config=FINETUNE),
                             cwd=runner.REPO, env=runner.child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  killed_after = wait_for_step(process, interrupted, 120)
  process.kill()
  process.wait()
  assert max(checkpoint_steps(interrupted)) < killed_after
  finished = runner.run_main(interrupted, *args, config=FINETUNE)
  assert finished.returncode == 0, finished.stdout + finished.stderr
  assert 'Resumed from' in finished.stdout
  runner.assert_same_run(straight, interrupted, 200)
