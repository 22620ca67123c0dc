"""`python -m ssl_jax.probe` and its protocols (configs/probe.py, eval/linear_probe.py)."""

import importlib.util
import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ssl_jax import checkpoint, methods, sharding
from ssl_jax.eval import linear_probe
from ssl_jax.eval.block_features import last_blocks_features
from tests.runner import REPO, child_env, run_main


def probe_config(variant=None) -> ml_collections.ConfigDict:
  """configs/probe.py's get_config(variant), loaded as config_flags loads it."""
  spec = importlib.util.spec_from_file_location('probe_config', REPO / 'configs' / 'probe.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def run_probe(*args, timeout=300) -> subprocess.CompletedProcess:
  """The probe CLI in a child process."""
  return subprocess.run([sys.executable, '-m', 'ssl_jax.probe', *args], cwd=REPO,
                        env=child_env(), capture_output=True, text=True, timeout=timeout)


def last_json(result: subprocess.CompletedProcess) -> dict:
  """The JSON object on the last stdout line."""
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------
# Protocol pieces against NumPy.
# ------------------------------------------------------------------------------
def test_batchnorm_without_affine_is_torch_batchnorm_eval():
  rng = np.random.default_rng(0)
  train = rng.normal(3.0, 2.0, size=(64, 5))
  test = rng.normal(size=(7, 5))
  mean, var = train.mean(0), ((train - train.mean(0)) ** 2).mean(0)  # Biased, as BatchNorm.
  got = linear_probe.batchnorm_without_affine(test, train.mean(0), train.var(0), 1e-6)
  np.testing.assert_allclose(got, (test - mean) / np.sqrt(var + 1e-6), rtol=1e-5)
  standardised = linear_probe.batchnorm_without_affine(train, train.mean(0), train.var(0), 1e-6)
  np.testing.assert_allclose(standardised.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(standardised.std(0), 1.0, atol=1e-4)


def _softmax_ce_grad(x, y, kernel, bias):
  """Gradients of the mean softmax cross-entropy of x @ kernel + bias, by hand."""
  logits = x @ kernel + bias
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  p[np.arange(len(y)), y] -= 1.0
  return x.T @ p / len(y), p.mean(0)


def test_one_lars_step_matches_mae_lars():
  """One full-batch step of the MAE protocol equals mae util/lars.py on the same gradient."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(32, 6)).astype(np.float32)
  y = rng.integers(0, 4, size=32)
  init = {'kernel': rng.normal(size=(6, 4)) * 0.01, 'bias': rng.normal(size=4) * 0.1}
  block = probe_config('mae').eval.linear_probe
  block.update(dict(epochs=1, min_steps=0, warmup_epochs=0.0, weight_decay=1e-4))
  params, batch, steps = linear_probe.fit_protocol_head(x, y, 4, block, init=init)
  assert (batch, steps) == (32, 1)
  lr = block.lr * 32 / 256  # Linear scaling, at the (capped) batch; cosine at step 0 = peak.
  g_kernel, g_bias = _softmax_ce_grad(x, y, init['kernel'], init['bias'])
  # util/lars.py L31-46: decay and trust ratio on ndim > 1 only; mu = dp (first step).
  dp = g_kernel + 1e-4 * init['kernel']
  trust = 0.001 * np.linalg.norm(init['kernel']) / np.linalg.norm(dp)
  np.testing.assert_allclose(params['kernel'], init['kernel'] - lr * trust * dp, rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(params['bias'], init['bias'] - lr * g_bias, rtol=1e-4, atol=1e-7)


def test_two_sgd_steps_match_torch_sgd_momentum():
  """DINO / SimCLR protocols: SGD with momentum 0.9 and a cosine over the steps."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(16, 3)).astype(np.float32)
  y = rng.integers(0, 3, size=16)
  init = {'kernel': np.zeros((3, 3)), 'bias': np.zeros(3)}
  block = probe_config('simclr').eval.linear_probe
  block.update(dict(epochs=2, min_steps=0, batch_size=16))
  params, _, steps = linear_probe.fit_protocol_head(x, y, 3, block, init=init)
  assert steps == 2
  peak = 0.1 * 16 / 256
  lrs = [peak, peak * 0.5 * (1 + math.cos(math.pi * 1 / 2))]
  kernel, bias, buf_k, buf_b = init['kernel'], init['bias'], 0.0, 0.0
  for lr in lrs:  # torch.optim.SGD: buf = m * buf + g; p -= lr * buf.
    g_k, g_b = _softmax_ce_grad(x, y, kernel, bias)
    buf_k, buf_b = 0.9 * buf_k + g_k, 0.9 * buf_b + g_b
    kernel, bias = kernel - lr * buf_k, bias - lr * buf_b
  np.testing.assert_allclose(params['kernel'], kernel, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(params['bias'], bias, rtol=1e-4, atol=1e-7)


def test_batch_is_capped_at_the_train_split_and_steps_kept_at_the_reference():
  """(batch, steps per epoch, epochs, warmup): min_steps adds epochs; warmup keeps its share."""
  block = probe_config('mae').eval.linear_probe
  assert linear_probe.probe_steps(1_281_167, block) == (16384, 78, 90, 780)  # 7020 steps.
  assert linear_probe.probe_steps(1437, block) == (1437, 1, 7020, 780)
  block.batch_size = 256
  assert linear_probe.probe_steps(1437, block) == (256, 5, 1404, 780)
  block.min_steps = 0
  assert linear_probe.probe_steps(1437, block) == (256, 5, 90, 50)
  # CIFAR-10: 97 whole batches an epoch here; the reference's 9,766 steps count the partial
  # ones (50,000 x 100 // 512 + 1), so one more epoch tops the run up.
  assert linear_probe.probe_steps(50_000, probe_config('simclr').eval.linear_probe)[2] == 101


def test_variants_hold_the_reference_values():
  mae, simclr, dino = (probe_config(v).eval.linear_probe for v in ('mae', 'simclr', 'dino'))
  assert (mae.optimizer, mae.feature_norm, mae.batch_size, mae.epochs, mae.lr,
          mae.warmup_epochs) == ('lars', 'batchnorm', 16384, 90, 0.1, 10.0)
  assert (simclr.optimizer, simclr.batch_size, simclr.lr, simclr.head_init_std) == (
      'sgd', 512, 0.1, 0.0)
  assert (dino.n_last_blocks, dino.lr, dino.batch_size, dino.epochs) == (4, 0.001, 1024, 100)
  knn = probe_config('knn').eval
  assert knn.knn.enabled and not knn.linear_probe.enabled
  assert probe_config().protocol == 'mae'
  with pytest.raises(ValueError, match='Unknown variant'):
    probe_config('nope')


def test_finetune_variants_hold_the_finetune_configs():
  """configs/probe.py:finetune_RECIPE holds configs/finetune.py:RECIPE whole, and kNN alone."""
  spec = importlib.util.spec_from_file_location('finetune', REPO / 'configs' / 'finetune.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for variant, recipe in (('finetune', None), ('finetune_vit_l', 'vit_l'),
                          ('finetune_resnet', 'resnet'), ('finetune_local', 'local'),
                          ('finetune_resnet_local', 'resnet_local')):
    config = probe_config(variant)
    assert config.protocol == 'finetune' and config.finetune_recipe == (recipe or '')
    assert config.finetune.to_dict() == module.get_config(recipe).to_dict(), variant
    assert config.eval.knn.enabled and not config.eval.linear_probe.enabled
  # simclr README.md L157-166: LARS, lr 0.005 with sqrt scaling, no decay, 60 epochs, zero head.
  resnet = probe_config('finetune_resnet').finetune
  assert (resnet.optim.name, resnet.optim.lr, resnet.optim.lr_scaling, resnet.optim.weight_decay,
          resnet.train.epochs, resnet.data.batch_size, resnet.model.head_init_std,
          resnet.augment.mixup, resnet.augment.cutmix) == (
              'lars', 0.005, 'sqrt', 0.0, 60.0, 1024, 0.0, 0.0, 0.0)
  with pytest.raises(ValueError, match='Unknown variant'):
    probe_config('finetune_nope')


def _tiny_mae_encoder():
  config = _tiny_mae_config()
  method = methods.create(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    return method.build_encoder(nnx.Rngs(0)), method, config


def _tiny_mae_config():
  spec = importlib.util.spec_from_file_location('mae_vit', REPO / 'configs' / 'mae_vit.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('local')
  config.model.update(dict(width=32, depth=3, mlp_dim=64, num_heads=2))
  return config


def test_last_block_feature_is_the_cls_output():
  """n_last_blocks=1 is the ViT's final [CLS]; n=3 puts the earlier blocks' first."""
  encoder, method, config = _tiny_mae_encoder()
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, 16, 16, 1)), jnp.uint8)
  kwargs = dict(mean=config.data.mean, std=config.data.std)
  one = last_blocks_features(encoder, images, n_last_blocks=1, avgpool_patchtokens=True,
                             **kwargs)
  np.testing.assert_allclose(one[:, :32], method.features(encoder, images), atol=1e-5)
  config.eval.pool = 'patch_mean'
  np.testing.assert_allclose(one[:, 32:], method.features(encoder, images), atol=1e-5)
  three = last_blocks_features(encoder, images, n_last_blocks=3, avgpool_patchtokens=False,
                               **kwargs)
  assert three.shape == (2, 96)
  np.testing.assert_allclose(three[:, 64:], one[:, :32], atol=1e-5)


# ------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------
def test_bad_input_fails_with_a_message(tmp_path):
  no_export = run_probe(f'--workdir={tmp_path}')
  assert no_export.returncode != 0 and 'holds no export' in no_export.stderr
  unknown = run_probe(f'--workdir={tmp_path}', '--config.eval.bogus=1')
  assert unknown.returncode != 0 and 'unknown config key --config.eval.bogus' in unknown.stderr
  both = run_probe(f'--workdir={tmp_path}', f'--export={tmp_path}')
  assert both.returncode != 0 and 'exactly one of --workdir and --export' in both.stderr


def test_unlabelled_source_is_refused(tmp_path):
  encoder, _, config = _tiny_mae_encoder()
  checkpoint.export_encoder(tmp_path / 'export', encoder, config)
  images = np.random.default_rng(0).integers(0, 255, (20, 8, 8), dtype=np.uint8)
  np.savez(tmp_path / 'plain.npz', images=images)
  result = run_probe(f'--export={tmp_path / "export"}', '--config=configs/probe.py:knn',
                     f'--config.eval.train_source=npz:{tmp_path / "plain.npz"}',
                     f'--config.eval.test_source=npz:{tmp_path / "plain.npz"}')
  assert result.returncode != 0 and 'has no labels' in result.stderr, result.stderr[-2000:]


_FINETUNE_TINY = ('--config=configs/probe.py:finetune_local', '--config.finetune.train.steps=4',
                  '--config.finetune.train.log_every=2', '--config.finetune.optim.warmup_steps=1',
                  '--config.finetune.train.checkpoint_every=2')


@pytest.mark.slow
def test_finetune_protocol_trains_and_resumes_on_the_trainer(tmp_path):
  """A fine-tuning run in WORKDIR/finetune from the export; the rerun resumes, not retrains."""
  encoder, _, config = _tiny_mae_encoder()
  checkpoint.export_encoder(tmp_path / 'export', encoder, config)
  first = last_json(run_probe(f'--workdir={tmp_path}', *_FINETUNE_TINY))
  assert first['protocol'] == 'finetune' and 0.0 <= first['finetune_top1'] <= 1.0
  assert 'knn_top1' in first and first['finetune_workdir'] == str(tmp_path / 'finetune')
  run = tmp_path / 'finetune'
  assert checkpoint.latest_saved_step(run) == 4 and (run / 'export' / 'encoder').is_dir()
  saved = json.loads((run / 'config.json').read_text())
  assert saved['train']['init_from'] == str(tmp_path / 'export')
  assert saved['data']['source'] == 'digits:train' and saved['data']['channels'] == 1
  again = run_probe(f'--workdir={tmp_path}', *_FINETUNE_TINY)
  assert 'Resumed from' in again.stdout, again.stdout[-2000:]
  assert last_json(again)['finetune_top1'] == first['finetune_top1']


def test_finetune_recipe_must_fit_the_encoder(tmp_path):
  """A ViT export with the ResNet recipe is refused before any work, naming the right one."""
  encoder, _, config = _tiny_mae_encoder()
  checkpoint.export_encoder(tmp_path / 'export', encoder, config)
  result = run_probe(f'--workdir={tmp_path}', '--config=configs/probe.py:finetune_resnet_local')
  assert result.returncode != 0 and 'configs/probe.py:finetune[_vit_l|_local]' in result.stderr
  assert not (tmp_path / 'finetune').exists()


# ------------------------------------------------------------------------------
# Trained exports (slow: each trains a short run first).
# ------------------------------------------------------------------------------
_NO_EVALS = ('--config.eval.knn.enabled=False', '--config.eval.linear_probe.enabled=False',
             '--config.eval.pictures.enabled=False', '--config.eval.random_init_baseline=False',
             '--config.eval.held_out.enabled=False')


@pytest.fixture(scope='module')
def mae_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('mae')
  result = run_main(workdir, '--config.train.steps=300', *_NO_EVALS[:4], fast_compile=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_trained_mae_export_beats_random_init(mae_workdir):
  trained = last_json(run_probe(f'--workdir={mae_workdir}'))
  assert (mae_workdir / 'probe.json').exists()
  assert json.loads((mae_workdir / 'probe.json').read_text())['knn_top1'] == trained['knn_top1']
  random = last_json(run_probe(f'--workdir={mae_workdir}', '--random_init'))
  for key in ('knn_top1', 'linear_top1', 'knn_seconds', 'linear_seconds'):
    assert key in trained and key in random
  assert trained['knn_top1'] > random['knn_top1'] + 0.05, (trained, random)
  # The digits are nearly linearly separable from a random ViT's features (0.94
  # at :local scale), so the linear probe must converge, not beat it by much.
  assert trained['linear_top1'] > 0.85 and trained['linear_steps'] == 7020, trained


@pytest.mark.slow
def test_dino_protocol_on_an_export_path(mae_workdir):
  """--export alone; the DINO protocol's last-4 [CLS] on a 4-block ViT."""
  result = last_json(run_probe(f'--export={mae_workdir / "export"}',
                               '--config=configs/probe.py:dino',
                               '--config.eval.linear_probe.min_steps=5000'))  # Not 125,200.
  assert result['feature_dim'] == 4 * 128 and result['linear_steps'] == 5000
  assert result['linear_top1'] > 0.4
  assert (mae_workdir / 'export' / 'probe.json').exists()


@pytest.mark.slow
def test_gpt_export_scores_below_the_uniform_guess(tmp_path):
  result = run_main(tmp_path, '--config.train.steps=60', '--config.model.depth=2',
                    *_NO_EVALS[4:], config='configs/gpt.py:local', fast_compile=False)
  assert result.returncode == 0, result.stderr[-3000:]
  scores = last_json(run_probe(f'--workdir={tmp_path}', '--config=configs/probe.py:lm'))
  assert math.isfinite(scores['val_loss'])
  assert scores['uniform_loss'] == pytest.approx(math.log(1024))
  assert scores['val_loss'] < scores['uniform_loss'] - 0.5
  assert scores['perplexity'] == pytest.approx(math.exp(scores['val_loss']))
  assert (tmp_path / 'probe.json').exists()
