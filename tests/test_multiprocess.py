"""Two processes on one machine (jax.distributed over 127.0.0.1) train as one job.

Each process reads its own share of every global batch and places it with
`jax.make_array_from_process_local_data`. The test recomputes the same steps
in this process, on two devices, from the two shares concatenated, and
checks the two-process run got the same losses and parameters; then it
reruns the two processes to check they restore the checkpoint together.
"""

import socket
import subprocess

import jax
import numpy as np
from flax import nnx

from ssl_jax import checkpoint, methods, sharding, train
from ssl_jax.data import pipeline
from tests import runner

STEPS = ('--config.train.steps=6', '--config.train.checkpoint_every=3',
         '--config.eval.knn.enabled=True')  # The kNN's cross-host gathers too.


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_two_processes(workdir) -> list[str]:
  port = free_port()
  processes = [
      subprocess.Popen(
          runner.main_command(workdir, *runner.TINY, *STEPS,
                              f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                              f'--process_id={i}'),
          cwd=runner.REPO, env=runner.child_env(devices=1), stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=900)[0] for p in processes]
  for p, out in zip(processes, outputs, strict=True):
    assert p.returncode == 0, out
  return outputs


def reference_run(config, num_steps):
  """The same steps in this process: 2 devices, batches = both shares concatenated."""
  method = methods.create(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:2])
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


def test_two_processes_match_one_process_on_the_same_global_batches(tmp_path):
  outputs = run_two_processes(tmp_path)
  assert 'over 2 cpu devices' in outputs[0] and 'step 6/6' in outputs[0]
  assert 'kNN top-1' in outputs[0]
  assert 'step ' not in outputs[1] and 'kNN' not in outputs[1]  # Only process 0 reports.

  config = checkpoint.load_config(tmp_path / 'config.json')
  losses, params, knn_top1 = reference_run(config, 6)
  records = runner.read_metrics(tmp_path)
  np.testing.assert_allclose([r['loss'] for r in records if 'loss' in r], losses, rtol=1e-5)
  # The kNN probe gathered every host's features: same accuracy as on one host.
  assert abs([r for r in records if 'knn_top1' in r][-1]['knn_top1'] - knn_top1) <= 1 / 360
  saved = runner.restore_state(tmp_path, 6)
  for key, value in runner.flat_dict(params).items():
    np.testing.assert_allclose(saved[f'params/{key}/value'], value, rtol=1e-5, atol=1e-6,
                               err_msg=key)

  # Both processes find and restore the finished checkpoint together.
  again = run_two_processes(tmp_path)
  assert f'Resumed from {tmp_path / "checkpoints" / "6"}' in again[0]
