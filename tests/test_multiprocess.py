"""Two processes on one machine (launch/local.sh, jax.distributed over 127.0.0.1) train as one job.

Each process has 4 fake CPU devices, reads its own share of every global
batch and places it with `jax.make_array_from_process_local_data`. The
two-process run must equal one process with all 8 devices on the same global
batches: MAE is recomputed here (conftest gives this process 8 devices) from
the two shares concatenated, since its masking noise is drawn per batch row
and the 1-process stream orders the rows differently; GPT (no dropout, a
mean over rows) is compared with a plain 1-process run of the same command.

Start-up and shutdown are made deterministic rather than retried (see
`tests.launching.local_launch`): the coordinator's port is held for the
children, the launcher stops every process when one fails, a hung launch is
killed after a deadline, every process's whole output is kept in a file and
put in the assertion message, and each process leaves jax.distributed
through its shutdown barrier (ssl_jax/main.py).

Preemption is real here, not simulated: SIGTERM to one of the two processes
goes to jax's preemption notifier, and both stop at the step Orbax's
`reached_preemption` agrees on.
"""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssl_jax import checkpoint, methods, sharding, train
from ssl_jax.data import pipeline
from tests import runner, test_text_main
from tests.launching import local_launch, wait_for_line

STEPS = ('--config.train.steps=6', '--config.train.checkpoint_every=3',
         '--config.eval.knn.enabled=True',  # The kNN's cross-host gathers too.
         '--config.eval.linear_probe.enabled=False')  # Time; it gathers as the kNN does.


def reference_run(config, num_steps):
  """The same steps in this process on its 8 devices; batches = both shares concatenated."""
  method = methods.create(config)
  mesh = sharding.make_mesh(config.mesh)
  assert mesh.size == 8
  schedule, tx = train.build_optimizer(config)
  shares = [iter(pipeline.train_dataset(config.data, seed=config.seed, process_index=i,
                                        process_count=2)[0]) for i in range(2)]
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)  # As train_and_evaluate does.
  losses = []
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, config.seed)
    state = train.init_train_state(method, tx, shardings, config.seed)
    step_fn = train.make_train_step(method, graphdef, tx, schedule, shardings, mesh)
    for _ in range(num_steps):
      parts = [next(share) for share in shares]
      batch = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
      state, metrics = step_fn(state, sharding.put_batch(batch, mesh), rng)
      losses.append(float(metrics['loss']))
    params = jax.device_get(nnx.to_pure_dict(state['params']))
    encoder = method.encoder(nnx.merge(graphdef, state['params'], state['model_state']))
    knn_top1 = runner.knn_top1(config, method, encoder, mesh)
  return losses, params, knn_top1


def assert_params_equal(saved: dict, params: dict, key_bias_atol: float) -> None:
  """Equal within float tolerance, except attention's key bias, within `key_bias_atol`.

  The key bias adds q.b_k to a whole row of logits, which softmax ignores: its
  gradient is zero but for rounding, which depends on how the 8 devices'
  reductions are grouped, and Adam scales that noise up to a full lr-sized
  step. So it is only checked to move no more than Adam could (the sum of lr).
  """
  for key, value in runner.flat_dict(params).items():
    got = saved[f'params/{key}/value']
    if key.endswith('qkv/bias'):  # (3, heads, head_dim): query, key, value.
      np.testing.assert_allclose(got[1], value[1], atol=key_bias_atol, err_msg=key)
      got, value = got[::2], value[::2]
    np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow  # 70 s; the GPT two-process test covers the launch in the default run.
def test_two_processes_of_4_devices_match_one_process_of_8_mae(tmp_path):
  outputs = local_launch(tmp_path, *runner.TINY, *STEPS)
  assert 'over 8 cpu devices' in outputs[0] and 'step 6/6' in outputs[0]
  assert 'kNN top-1' in outputs[0]
  assert 'step ' not in outputs[1] and 'kNN' not in outputs[1]  # Only process 0 reports.

  config = checkpoint.load_config(tmp_path / 'config.json')
  losses, params, knn_top1 = reference_run(config, 6)
  records = runner.read_metrics(tmp_path)
  np.testing.assert_allclose([r['loss'] for r in records if 'loss' in r], losses, rtol=1e-5)
  # The kNN probe gathered every host's features: same accuracy as on one host.
  assert abs([r for r in records if 'knn_top1' in r][-1]['knn_top1'] - knn_top1) <= 1 / 360
  lr_sum = sum(r['lr'] for r in records if 'loss' in r)
  assert_params_equal(runner.restore_state(tmp_path, 6), params, key_bias_atol=lr_sum)

  # Both processes find and restore the finished checkpoint together.
  again = local_launch(tmp_path, *runner.TINY, *STEPS)
  assert f'Resumed from {tmp_path / "checkpoints" / "6"}' in again[0]


@pytest.mark.slow
def test_two_processes_of_4_devices_match_one_process_of_8_gpt(tmp_path):
  steps = ('--config.train.steps=4', '--config.train.checkpoint_every=2')
  two = tmp_path / 'two'
  local_launch(two, *test_text_main.TINY, *steps, config=test_text_main.GPT_LOCAL)
  one = tmp_path / 'one'
  result = runner.run_main(one, *test_text_main.TINY, *steps, config=test_text_main.GPT_LOCAL,
                           devices=8)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (two / 'tokenizer.json').read_text() == (one / 'tokenizer.json').read_text()
  np.testing.assert_allclose([loss for _, loss in runner.logged_losses(two)],
                             [loss for _, loss in runner.logged_losses(one)], rtol=1e-5)
  want, got = runner.restore_state(one, 4), runner.restore_state(two, 4)
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_orbax_preemption_step(tmp_path):
  """A preemption notice to one host: every host saves the same step and exits cleanly.

  Real, not simulated: on CPU too, jax.distributed's preemption notifier takes
  SIGTERM, and Checkpointer.reached_preemption (Orbax) reports the agreed step.
  """
  def preempt_process_1(log_dir):
    wait_for_line(log_dir / 'process_0.log', 'step 3/')
    os.kill(int((log_dir / 'pids').read_text().split()[1]), signal.SIGTERM)

  outputs = local_launch(tmp_path, *runner.TINY, '--config.train.steps=5000',
                         '--config.train.checkpoint_every=5000', on_started=preempt_process_1,
                         timeout=300)
  assert 'SIGTERM caught' in outputs[1] and 'SIGTERM' not in outputs[0]  # jax's notifier.
  assert 'Stopped by signal at step' in outputs[0]
  saved = sorted(int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  last_logged = runner.logged_losses(tmp_path)[-1][0]
  assert saved == [last_logged] and 3 <= last_logged < 5000, (saved, last_logged)


def test_stop_signal_leaves_sigterm_to_jax_preemption_notifier():
  """Under jax.distributed SIGTERM stays jax's, else reached_preemption never fires; SIGINT ours."""
  assert not checkpoint.jax_catches_sigterm()  # This process never called initialize.
  before = signal.getsignal(signal.SIGTERM)
  stop = train.StopSignal(sigterm=False)
  try:
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) == stop._handle
  finally:
    stop.restore()


def test_stop_on_a_checkpoint_step_saves_once(tmp_path):
  """A stop at a step the loop just saved is no error (Orbax refuses a step twice)."""
  saver = checkpoint.Checkpointer(tmp_path, keep=2)
  data = iter(grain.MapDataset.range(8).to_iter_dataset())
  try:
    assert saver.save(3, {'w': jnp.ones(2)}, data)
    assert not saver.save(3, {'w': jnp.ones(2)}, data, force=True)
  finally:
    saver.close()
  assert saver.latest_step() == 3
