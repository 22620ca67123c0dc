"""SimCLR train-step throughput with the views' colour made on device vs on the host.

Run from the repository root:

  python -m benchmarks.simclr_step_bench [--config configs/simclr_resnet.py:cifar10]
      [--batch 128] [--rounds 5] [--steps 5]

Both sides cut the two views on the host, one image at a time with Pillow
(random resized crop of the whole image + flip), single-threaded and timed:
- colour on device (the trainer's design): `pipeline.MultiViewTransform` of
  the method's `view_specs`, then the real jitted train step
  (ssl_jax.train.make_train_step), which colours both views inside jit;
- colour on host: the same encoder, projection head and NT-Xent in one jitted
  step that receives two float views made wholly on the host with Pillow
  (benchmarks/device_augment_bench.host_view), as a PyTorch DataLoader
  worker would.

Both are timed in alternation in one run (this machine's speed drifts by up
to 2x between runs); the table gives the median images/s over rounds and the
spread. Images are random uint8, 4:3, with a short side of the view size.
"""

import argparse
import importlib.util
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.device_augment_bench import host_view
from ssl_jax import host_memory, losses, methods, sharding, train
from ssl_jax.data import pipeline


def build(config):
  """The real train step, and a step that takes host-made views instead."""
  method = methods.create(config)
  mesh = sharding.make_mesh(config.mesh)
  schedule, tx = train.build_optimizer(config)
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, config.seed)
    state = train.init_train_state(method, tx, shardings, config.seed)
    device_step = train.make_train_step(method, graphdef, tx, schedule, shardings, mesh)

  @jax.jit
  def views_step(state, views):  # views: (2B, S, S, C), already augmented and in [0, 1].
    def loss_of(params):
      model = nnx.merge(graphdef, params, state['model_state'], copy=True)
      features = model.encoder(method._normalize(views), train=True)['pooled']
      z = model.projector(features, train=True)
      num = views.shape[0] // 2
      return losses.ntxent_loss(z[:num], z[num:], config.model.temperature)
    loss, grads = jax.value_and_grad(loss_of)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    return {**state, 'params': optax.apply_updates(state['params'], updates),
            'opt_state': opt_state}, loss

  return method, mesh, state, device_step, views_step


def main():
  host_memory.keep_freed_memory()  # As the entry points do, before jax starts its backend.
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/simclr_resnet.py:cifar10')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=5)
  args = parser.parse_args()
  path, _, variant = args.config.partition(':')
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  config.data.batch_size = args.batch
  config.model.dtype = 'float32' if jax.default_backend() == 'cpu' else config.model.dtype
  config = train.resolve_config(config, num_train_examples=50_000)
  a = config.augment
  size, channels = a.size, config.data.channels
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, size, size * 4 // 3, channels), np.uint8)
  labels = rng.integers(0, 10, args.batch).astype(np.int32)
  method, mesh, state, device_step, views_step = build(config)
  transform = pipeline.MultiViewTransform(method.view_specs(method.config), channels)
  key = jax.random.key(0)

  def run_device():
    nonlocal state
    for _ in range(args.steps):
      views = np.stack([transform.random_map({'image': x, 'label': 0}, rng)['views']
                        for x in images])  # (B, 2, S, S, C) uint8
      batch = sharding.put_batch({'views': views, 'label': labels}, mesh)
      state, metrics = device_step(state, batch, key)
    jax.block_until_ready(metrics['loss'])

  def run_host():
    nonlocal state
    for _ in range(args.steps):
      views = np.stack([host_view(image, rng, a.size, a.jitter_strength, a.blur_prob)
                        for _ in range(2) for image in images])
      state, loss = views_step(state, jnp.asarray(views))
    jax.block_until_ready(loss)

  print(f'{config.method} {args.config}: batch {args.batch} of {images.shape[1:]}, views {size}px, '
        f'{jax.device_count()} {jax.default_backend()} device(s); compiling...', flush=True)
  run_device()
  run_host()
  rates = {'colour on device (in the jitted step)': [], 'colour on host (Pillow, 1 thread)': []}
  for _ in range(args.rounds):
    for name, run in zip(rates, (run_device, run_host), strict=True):
      start = time.perf_counter()
      run()
      rates[name].append(args.batch * args.steps / (time.perf_counter() - start))
  print(f'{"":40s} {"images/s (median)":>18s} {"min-max":>16s}')
  for name, values in rates.items():
    print(f'{name:40s} {statistics.median(values):18.0f} '
          f'{min(values):7.0f}-{max(values):<8.0f}')


if __name__ == '__main__':
  main()
