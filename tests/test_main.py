"""The command line as a user meets it: each method runs, bad input fails clearly, :local learns."""

import json
import time

import numpy as np
import pytest

from ssl_jax import checkpoint, methods, sharding
from tests import runner


def check_local_run(workdir, result, steps, *, loss_drop, probes=('knn_top1', 'linear_top1')):
  """What every :local run must show: falling loss, probes above random init, outputs."""
  assert result.returncode == 0, result.stdout + result.stderr
  records = runner.read_metrics(workdir)
  train = [r for r in records if 'loss' in r]
  assert [r['step'] for r in train][-1] == steps
  for key in ('lr', 'steps_per_sec', 'images_per_sec', 'grad_norm'):
    assert key in train[-1]
  first, last = train[0]['loss'], train[-1]['loss']
  assert last < first - loss_drop, (first, last)
  final = [r for r in records if 'knn_top1' in r][-1]
  for probe in probes:
    assert final[probe] > final[f'{probe}_random_init'] + 0.01, final
    assert final[probe] > 0.8, final  # Ten classes: chance is 0.1.
  assert 'kNN top-1' in result.stdout and 'random init' in result.stdout
  config = json.loads((workdir / 'config.json').read_text())
  assert config['train']['steps'] == steps and config['optim']['peak_lr'] > 0
  assert list((workdir / 'images').glob('step_*.png'))
  assert list(workdir.glob('events.out.tfevents.*'))
  check_export(workdir, final)
  return final


def check_export(workdir, final):
  """The exported encoder reloads and gives the kNN accuracy the trainer logged.

  Within 3 of the 360 test digits: the export's weights equal the final
  checkpoint's bit for bit, and its features are the same on any mesh and
  eval batch size, but the trainer computes them in another compiled program,
  whose rounding can flip near-tied kNN votes; after 8 steps (test_main's
  SHORT runs) 1 or 2 flipped. A wrong or stale export moves it by far more.
  """
  encoder, method = methods.load_encoder(workdir / 'export')
  config = checkpoint.load_config(workdir / 'export' / 'config.json')
  mesh = sharding.make_mesh(sharding.mesh_config())  # load_encoder's default: all 8 devices.
  assert abs(runner.knn_top1(config, method, encoder, mesh) - final['knn_top1']) <= 3 / 360


@pytest.mark.slow
def test_mae_local_config_learns(tmp_path):
  """The :local job exactly as the README runs it (about 2.5 minutes on 2 cores)."""
  start = time.time()
  result = runner.run_main(tmp_path, fast_compile=False)
  # About 1.9 -> 0.42. kNN: ~0.90-0.92 vs 0.69 at random init. The linear probe
  # (0.96-0.97) barely beats random init's 0.953 on these easy digits, too
  # little to assert a margin on; the log reports both.
  final = check_local_run(tmp_path, result, 1000, loss_drop=1.0, probes=('knn_top1',))
  # The README's claim, "kNN 0.90 against 0.69 for a random encoder": hold the
  # run to most of it (a 0.15 margin of the ~0.21 measured), not just to +0.01.
  assert final['knn_top1'] >= 0.85, final
  assert final['knn_top1'] >= final['knn_top1_random_init'] + 0.15, final
  print(f'\nMAE :local wall time {time.time() - start:.0f} s; {final}')


@pytest.mark.slow
def test_simclr_local_config_learns(tmp_path):
  """SimCLR's :local job as a user runs it (about 3.5 minutes on 2 cores)."""
  start = time.time()
  result = runner.run_main(tmp_path, config='configs/simclr_resnet.py:local', fast_compile=False)
  # The objective (2 x NT-Xent of 2 x 256 views) starts near 2 log(511) = 12.5 and cannot
  # reach 0. Probes ~0.98-0.99.
  final = check_local_run(tmp_path, result, 400, loss_drop=2.0)  # 12.9 -> 9.7 measured.
  assert final['probe_top1'] > 0.9, final  # The online probe, trained alongside.
  assert 'online probe top-1' in result.stdout
  print(f'\nSimCLR :local wall time {time.time() - start:.0f} s; {final}')


# A few steps of each image method's :local recipe at batch 32: the whole command line.
SHORT = ('--config.train.steps=8', '--config.train.log_every=4', '--config.train.eval_every=0',
         '--config.data.batch_size=32', '--config.eval.linear_probe.enabled=False',
         '--config.eval.random_init_baseline=False', '--config.optim.warmup_steps=2')


# SimCLR's and DINO's are slow-marked: their full :local runs (slow) cover the same path.
@pytest.mark.parametrize('config', [
    'mae_vit', pytest.param('simclr_resnet', marks=pytest.mark.slow),
    pytest.param('dino_vit', marks=pytest.mark.slow)])
def test_image_method_runs_end_to_end(tmp_path, config):
  """Progress, metrics, pictures, TensorBoard, checkpoint and an export that reloads.

  Whether each :local recipe learns is checked by its full run, `pytest -m slow`.
  """
  result = runner.run_main(tmp_path, *SHORT, config=f'configs/{config}.py:local')
  assert result.returncode == 0, result.stdout + result.stderr
  train = [r for r in runner.read_metrics(tmp_path) if 'loss' in r]
  assert [r['step'] for r in train] == [1, 4, 8]
  for key in ('lr', 'steps_per_sec', 'images_per_sec', 'grad_norm', 'param_norm'):
    assert np.isfinite(train[-1][key]), (key, train[-1])
  assert 'step 8/8' in result.stdout and 'kNN top-1' in result.stdout
  assert (tmp_path / 'checkpoints' / '8').is_dir()
  assert list((tmp_path / 'images').glob('step_*.png'))
  assert list(tmp_path.glob('events.out.tfevents.*'))
  final = [r for r in runner.read_metrics(tmp_path) if 'knn_top1' in r][-1]
  assert 0.1 < final['knn_top1'] <= 1  # Above chance even at random init (digits are easy).
  check_export(tmp_path, final)


def run_expecting_error(tmp_path, *overrides, config='configs/mae_vit.py:local'):
  start = time.time()
  result = runner.subprocess.run(
      runner.main_command(tmp_path / 'w', *overrides, config=config), cwd=runner.REPO,
      env=runner.child_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr
  return result.stderr, time.time() - start


def test_unknown_config_key_is_named(tmp_path):
  stderr, _ = run_expecting_error(tmp_path, '--config.train.stepz=5')
  assert 'unknown config key --config.train.stepz' in stderr
  assert 'did you mean "steps"' in stderr
  stderr, _ = run_expecting_error(tmp_path, '--config.nosuch.key=1')
  assert 'unknown config key --config.nosuch.key' in stderr


def test_unknown_variant_is_named(tmp_path):
  stderr, _ = run_expecting_error(tmp_path, config='configs/mae_vit.py:vit_z')
  assert "Unknown variant 'vit_z'" in stderr


def test_missing_imagenet_fails_fast_with_instructions(tmp_path):
  data_dir = tmp_path / 'tfds'
  stderr, seconds = run_expecting_error(tmp_path, f'--config.data.tfds_dir={data_dir}',
                                        config='configs/mae_vit.py')
  assert str(data_dir) in stderr and 'tfds build imagenet2012' in stderr
  assert 'folder:' in stderr  # The TensorFlow-free alternative.
  assert seconds < 30
  assert not (tmp_path / 'w' / 'checkpoints').exists()


@pytest.mark.parametrize('source,message', [
    ('folder:/no/such/dir', "no such directory '/no/such/dir'"),
    ('npz:/no/such.npz', "no such file '/no/such.npz'"),
    ('digits:nosplit', 'nosplit'),
])
def test_bad_data_source_names_the_problem(tmp_path, source, message):
  stderr, seconds = run_expecting_error(tmp_path, f'--config.data.source={source}')
  assert message in stderr and seconds < 30


def test_malformed_npz_is_rejected(tmp_path):
  path = tmp_path / 'bad.npz'
  np.savez(path, images=np.zeros((10, 8, 8, 5), np.uint8))  # 5 channels.
  stderr, _ = run_expecting_error(tmp_path, f'--config.data.source=npz:{path}')
  assert str(path) in stderr and '(10, 8, 8, 5)' in stderr and 'C 1 or 3' in stderr
