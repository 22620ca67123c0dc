"""Runs `python -m ssl_jax.main` in a child process, as a user would."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from ssl_jax.eval import knn
from ssl_jax.eval.passes import LabelledData, extract_features

REPO = pathlib.Path(__file__).resolve().parents[1]

# A few-second MAE run: the :local recipe on a smaller model and batch.
TINY = (
    '--config.data.batch_size=32',
    '--config.model.width=32', '--config.model.depth=1', '--config.model.mlp_dim=64',
    '--config.model.decoder_width=32', '--config.model.decoder_depth=1',
    '--config.model.decoder_mlp_dim=64',
    '--config.optim.warmup_steps=5',
    '--config.train.log_every=1',
    '--config.train.eval_every=0',
    '--config.eval.knn.enabled=False',
)


def child_env(fast_compile: bool = True, devices: int = 1) -> dict[str, str]:
  """Environment for a child run: its own device count, optional cheap compiles."""
  env = dict(os.environ)
  flags = [f'--xla_force_host_platform_device_count={devices}']
  if fast_compile:
    flags.append('--xla_backend_optimization_level=0')
  env['XLA_FLAGS'] = ' '.join(flags)
  env['PYTHONUNBUFFERED'] = '1'
  return env


def main_command(workdir, *overrides, config='configs/mae_vit.py:local') -> list[str]:
  """The argv of one trainer run."""
  return [sys.executable, '-m', 'ssl_jax.main', f'--config={config}', f'--workdir={workdir}',
          *overrides]


def run_main(workdir, *overrides, config='configs/mae_vit.py:local', timeout=900,
             **env_options) -> subprocess.CompletedProcess:
  """Runs the trainer to completion; returns its output (stdout and stderr as text)."""
  return subprocess.run(main_command(workdir, *overrides, config=config), cwd=REPO,
                        env=child_env(**env_options), capture_output=True, text=True,
                        timeout=timeout)


def read_metrics(workdir) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def restore_state(workdir, step: int) -> dict:
  """The saved train state at `step` as host arrays, keyed by tree path.

  Restored onto one local device, whatever topology saved it.
  """
  path = pathlib.Path(workdir) / 'checkpoints' / str(step) / 'state'
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        checkpointer.metadata(path).item_metadata)
  restored = checkpointer.restore(path, target)
  checkpointer.close()
  return flat_dict(restored)


def flat_dict(tree) -> dict[str, np.ndarray]:
  """{'params/encoder/.../kernel': array} for any pytree of arrays."""
  def name(path):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
  return {name(p): np.asarray(leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def knn_top1(config, method, encoder, mesh) -> float:
  """The trainer's kNN probe, recomputed for an encoder outside the trainer."""
  data = LabelledData(config)
  train = extract_features(method, encoder, data(config.eval.train_source), mesh)
  test = extract_features(method, encoder, data(config.eval.test_source), mesh)
  return knn.knn_accuracy(*train, *test, k=config.eval.knn.k,
                          temperature=config.eval.knn.temperature)


def logged_losses(workdir) -> list[tuple[int, float]]:
  """(step, loss) of every training line of WORKDIR/metrics.jsonl."""
  return [(r['step'], r['loss']) for r in read_metrics(workdir) if 'loss' in r]


def assert_same_run(straight, interrupted, step: int) -> None:
  """An interrupted-and-resumed run equals an uninterrupted one: state at `step` and every loss."""
  want, got = restore_state(straight, step), restore_state(interrupted, step)
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert logged_losses(interrupted) == logged_losses(straight)
