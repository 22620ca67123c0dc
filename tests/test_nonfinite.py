"""A non-finite step is skipped and counted; a diverging run stops, its checkpoints finite.

The injected case runs the trainer in-process with MAE whose loss (and so
every gradient) is NaN at chosen steps; the diverging case is a real
divergence (a learning rate of 1e30) run as a user would, through main.
"""

import jax.numpy as jnp
import numpy as np

from configs import mae_vit
from ssl_jax import methods, train
from ssl_jax.methods.mae import MAE
from tests import runner


def tiny_mae_config(steps: int):
  """runner.TINY as a config object (in-process runs cannot take flags)."""
  config = mae_vit.get_config('local')
  config.data.batch_size = 32
  config.model.update(dict(width=32, depth=1, mlp_dim=64, decoder_width=32, decoder_depth=1,
                           decoder_mlp_dim=64))
  config.optim.warmup_steps = 2
  config.train.update(dict(steps=steps, log_every=1, eval_every=0, checkpoint_every=1,
                           keep_checkpoints=10))
  config.eval.knn.enabled = config.eval.linear_probe.enabled = False
  return config


def mae_with_nan_at(steps: tuple[int, ...]) -> type[MAE]:
  """MAE whose loss and gradients are NaN at these (1-based, as logged) steps."""
  class NaNMAE(MAE):
    def loss_fn(self, model, batch, rng, step):
      loss, metrics = super().loss_fn(model, batch, rng, step)
      poisoned = jnp.isin(step + 1, jnp.array(steps))
      return loss * jnp.where(poisoned, jnp.nan, 1.0), metrics  # NaN times grads: NaN grads.
  return NaNMAE


def test_nonfinite_steps_are_skipped_counted_and_logged(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(methods, 'method_class', lambda config: mae_with_nan_at((4, 5)))
  train.train_and_evaluate(tiny_mae_config(steps=7), str(tmp_path))
  output = capsys.readouterr().out
  assert 'step 4: the loss or a gradient is not finite; step skipped' in output, output
  assert 'step 5: the loss or a gradient is not finite; step skipped' in output
  assert '2 in a row' in output and 'step 6: the loss' not in output

  records = {r['step']: r for r in runner.read_metrics(tmp_path) if 'loss' in r}
  assert [records[s]['nonfinite_steps'] for s in range(1, 8)] == [0, 0, 0, 1, 1, 0, 0]
  assert np.isnan(records[4]['loss']) and np.isfinite(records[6]['loss'])

  # Steps 4 and 5 changed nothing but the step counter; steps 3 and 6 did change things.
  states = {s: runner.restore_state(tmp_path, s) for s in (2, 3, 5, 6)}
  for key in states[3]:
    if key != 'step':
      np.testing.assert_array_equal(states[5][key], states[3][key], err_msg=key)
  assert int(states[5]['step']) == 5
  for before, after in ((2, 3), (5, 6)):
    kernel = 'params/encoder/encoder/blocks/0/mlp/fc1/kernel/value'
    assert np.abs(states[after][kernel] - states[before][kernel]).max() > 0, (before, after)


def test_a_window_mean_skips_the_skipped_steps():
  from ssl_jax.train_step import window_scalars
  window = [{'loss': np.float32(v), 'nonfinite_steps': np.int32(np.isnan(v))}
            for v in (1.0, np.nan, 3.0)]
  assert window_scalars(window) == {'loss': 2.0, 'nonfinite_steps': 1}
  assert np.isnan(window_scalars(window[1:2])['loss'])


def test_a_diverging_run_stops_with_an_error_and_finite_checkpoints(tmp_path):
  # Adam moves every weight by ~lr on the first applied step: from then on every forward
  # pass overflows, every step is skipped, and the third in a row stops the run.
  diverging = ('--config.optim.lr=1e30', '--config.optim.schedule=constant',
               '--config.optim.lr_scaling=none', '--config.train.max_nonfinite_steps=3',
               '--config.train.steps=40', '--config.train.checkpoint_every=1')
  result = runner.run_main(tmp_path, *runner.TINY, *diverging)
  assert result.returncode == 1, result.stdout + result.stderr
  assert 'error: 3 consecutive steps (2 to 4) had a non-finite loss' in result.stderr, result.stderr
  assert 'Traceback' not in result.stderr
  assert 'step 3: the loss or a gradient is not finite; step skipped' in result.stdout
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert saved and max(saved) == 3, saved  # Step 4 completed the limit: no save there.
  for step in saved:
    for key, value in runner.restore_state(tmp_path, step).items():
      assert np.isfinite(value).all(), (step, key)
