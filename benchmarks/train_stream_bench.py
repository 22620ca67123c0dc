"""Images/s of a config's real train stream + jitted train step, end to end.

Run from the root of a checkout (it uses only APIs that older trees have too,
so one copy of this script times any tree):

  python benchmarks/train_stream_bench.py --config configs/simclr_resnet.py:local
  python benchmarks/train_stream_bench.py --config configs/simclr_resnet.py:cifar10 \\
      --npz 32,32,3,2048 --batch 64 --set model.dtype=float32
  python benchmarks/train_stream_bench.py --config configs/dino_vit.py --npz 375,500,3,64 \\
      --batch 32 --host_only  # the ImageNet recipe's host pipeline alone
  cd /work/before && PYTHONPATH=. python /work/wt_views/benchmarks/train_stream_bench.py ...

Three figures, in this order, after `--warmup` steps (compile included):
  end_to_end  next(stream) -> put_batch -> step, for --steps steps (what training sees);
  host        next() of a fresh stream without prefetch threads, for --steps batches
              (the grain pipeline's work, in one thread);
  step        the step alone on one batch already on the device.
The last stdout line is a JSON object with them (images/s). Timings on a
shared CPU drift up to 2x between runs: compare trees in alternation.
"""

import argparse
import ast
import importlib.util
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags

sys.path.insert(0, os.getcwd())  # The checkout being timed, not this script's.

from ssl_jax import host_memory, methods, sharding, train  # noqa: E402
from ssl_jax.data import streams  # noqa: E402


def load_config(spec: str, overrides: list[str]):
  """configs/x.py[:variant] with `key.sub=value` overrides (Python literals)."""
  path, _, variant = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  for override in overrides:
    key, _, value = override.partition('=')
    *parents, leaf = key.split('.')
    block = config
    for parent in parents:
      block = block[parent]
    try:
      block[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      block[leaf] = value
  return config


def synthetic_npz(shape: str, directory: str) -> str:
  """An npz source of random uint8 images, 'H,W,C,N', with 10 classes."""
  height, width, channels, count = (int(x) for x in shape.split(','))
  rng = np.random.default_rng(0)
  path = os.path.join(directory, 'images.npz')
  np.savez(path, images=rng.integers(0, 256, (count, height, width, channels), np.uint8),
           labels=rng.integers(0, 10, count))
  return f'npz:{path}'


def main() -> None:
  host_memory.keep_freed_memory()  # As the entry points do, before jax starts its backend.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--batch', type=int, default=None, help='global batch (default: config)')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--npz', default=None, help='H,W,C,N: a synthetic source of that shape')
  parser.add_argument('--set', action='append', default=[], help='key.sub=value override')
  parser.add_argument('--host_only', action='store_true', help='time the stream alone')
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain reads absl flags.

  overrides = ['data.num_workers=0'] + args.set  # Threads only: one process per tree.
  if args.batch:
    overrides.append(f'data.batch_size={args.batch}')
  config = load_config(args.config, overrides)
  workdir = tempfile.mkdtemp()
  if args.npz:
    config.data.source = synthetic_npz(args.npz, workdir)
  batch_size = config.data.batch_size
  train_data = streams.train_data(config, methods.method_class(config).data_spec(config), workdir)
  stream = iter(train_data.dataset)
  print(f'{args.config} batch {batch_size}: {train_data.description}', flush=True)

  def host_rate() -> float:
    """Batches of a fresh stream read in this thread (no prefetch): the host's work."""
    synchronous = config.copy_and_resolve_references()
    synchronous.data.prefetch = 0
    spec = methods.method_class(synchronous).data_spec(synchronous)
    host_stream = iter(streams.train_data(synchronous, spec, workdir).dataset)
    next(host_stream)
    start = time.perf_counter()
    for _ in range(args.steps):
      next(host_stream)
    return args.steps * batch_size / (time.perf_counter() - start)

  result = {'config': args.config, 'batch': batch_size}
  if args.host_only:
    result['host'] = host_rate()
    print(json.dumps(result))
    return

  config = train.resolve_config(config, train_data.num_examples, train_data.config_updates)
  method = methods.create(config)
  mesh = sharding.make_mesh(config.mesh)
  schedule, tx = train.build_optimizer(config)
  key = jax.random.key(0)
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, config.seed)
    state = train.init_train_state(method, tx, shardings, config.seed)
    step = train.make_train_step(method, graphdef, tx, schedule, shardings, mesh)
    start = time.perf_counter()
    for _ in range(args.warmup):
      batch = sharding.put_batch(next(stream), mesh)
      state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    print(f'compile + {args.warmup} warm-up steps: {time.perf_counter() - start:.1f} s',
          flush=True)

    start = time.perf_counter()
    for _ in range(args.steps):
      batch = sharding.put_batch(next(stream), mesh)
      state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    result['end_to_end'] = args.steps * batch_size / (time.perf_counter() - start)
    result['host'] = host_rate()
    start = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    result['step'] = args.steps * batch_size / (time.perf_counter() - start)
  result['loss'] = float(metrics['loss'])
  print(json.dumps(result))


if __name__ == '__main__':
  main()
