"""SimCLR learning per step, ssl_jax against a PyTorch + kornia script of the same recipe.

Run from the repository root, in the project's venv:

  python -m benchmarks.simclr_side_by_side --out /tmp/sbs \
      [--torch_python /tmp/torchvenv/bin/python] [--steps 195] [--zero_init_residual both]

It writes a CIFAR-shaped held-out set made from the data that ships with the
install (scikit-learn's digits, 1437 train / 360 test, upsampled to 32x32 with
bicubic and repeated to RGB) as OUT/train.npz and OUT/test.npz, trains
ssl_jax's SimCLR on it (`python -m ssl_jax.main` with the overrides below),
and, with --torch_python (a venv with torch and kornia, see
benchmarks/simclr_torch_reference.py), the PyTorch script, each in its own
process, one after the other. It prints both kNN curves (k 200, T 0.1 on the
pooled features, train split -> test split) and a JSON object as its last line.

The recipe (the one issue 11 compared): ResNet-18 with the CIFAR stem at a
quarter width, projection 128 -> 512 -> 128, batch 256, SGD momentum 0.9 with
a cosine over the steps and no warmup, weight decay 5e-4 on kernels, NT-Xent
temperature 0.5, views RandomResizedCrop(0.08, 1) + flip + jitter strength 0.5
(p 0.8) + grayscale (p 0.2), no blur. lightly's NTXentLoss (the PyTorch side)
is the mean over the 2N anchors, with lr 0.12; ssl_jax optimises SimCLR's own
objective, twice that mean, so it gets lr 0.06: the same updates.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from ssl_jax.data.images import open_image_source


def write_data(out: str, size: int = 32) -> tuple[str, str]:
  """digits:train / digits:test upsampled to (size, size, 3) uint8 npz files."""
  os.makedirs(out, exist_ok=True)
  paths = []
  for split in ('train', 'test'):
    source = open_image_source(f'digits:{split}')
    examples = [source[i] for i in range(len(source))]
    images = np.stack([
        np.asarray(Image.fromarray(e['image'][..., 0]).resize((size, size),
                                                               Image.Resampling.BICUBIC))
        for e in examples])
    images = np.repeat(images[..., None], 3, axis=-1)  # (N, size, size, 3)
    path = os.path.join(out, f'{split}.npz')
    np.savez(path, images=images, labels=np.array([e['label'] for e in examples]))
    paths.append(path)
  return paths[0], paths[1]


def ours_command(train: str, test: str, workdir: str, steps: int, eval_every: int,
                 zero_init_residual: bool) -> list[str]:
  """`python -m ssl_jax.main` with the side-by-side recipe."""
  overrides = {
      'data.source': f'npz:{train}', 'data.batch_size': 256, 'data.image_size': 32,
      'data.num_workers': 0, 'augment.size': 32, 'augment.jitter_strength': 0.5,
      'augment.blur_prob': 0.0, 'model.depth': 18, 'model.stem': 'cifar',
      'model.width_multiplier': 0.25, 'model.projection_hidden': 512,
      'model.projection_dim': 128, 'model.temperature': 0.5, 'model.dtype': 'float32',
      'model.zero_init_residual': zero_init_residual,
      'optim.name': 'sgd', 'optim.lr': 0.06, 'optim.lr_scaling': 'none',
      'optim.weight_decay': 5e-4, 'optim.warmup_steps': 0, 'train.steps': steps,
      'train.log_every': eval_every, 'train.eval_every': eval_every,
      'train.checkpoint_every': steps, 'eval.knn.enabled': True,
      'eval.linear_probe.enabled': False, 'eval.knn.k': 200, 'eval.knn.temperature': 0.1,
      'eval.train_source': f'npz:{train}',
      'eval.test_source': f'npz:{test}', 'eval.batch_size': 360,
      'eval.random_init_baseline': True,
  }
  return [sys.executable, '-m', 'ssl_jax.main', '--config=configs/simclr_resnet.py:cifar10',
          f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in overrides.items()]


def knn_curve(workdir: str) -> dict[int, float]:
  """step -> knn_top1 from a run's metrics.jsonl."""
  curve = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'knn_top1' in record:
        curve[record['step']] = record['knn_top1']
      if 'knn_top1_random_init' in record:  # Scored once, at the end, on a fresh init.
        curve[0] = record['knn_top1_random_init']
  return curve


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--steps', type=int, default=195)
  parser.add_argument('--eval_every', type=int, default=39)
  parser.add_argument('--torch_python', default=None)
  parser.add_argument('--zero_init_residual', choices=['true', 'false', 'both'], default='both')
  parser.add_argument('--torch_flags', default='', help='extra flags for the PyTorch script')
  args = parser.parse_args()
  train, test = write_data(args.out)
  results = {}
  settings = {'true': [True], 'false': [False], 'both': [True, False]}[args.zero_init_residual]
  for zero_init in settings:
    name = f'ssl_jax zero_init_residual={zero_init}'
    workdir = os.path.join(args.out, f'ours_zero_init_{zero_init}')
    print(f'== {name}', flush=True)
    subprocess.run(ours_command(train, test, workdir, args.steps, args.eval_every, zero_init),
                   check=True)
    results[name] = knn_curve(workdir)
  if args.torch_python:
    for zero_init in settings:
      name = f'pytorch zero_init_residual={zero_init} {args.torch_flags}'.strip()
      print(f'== {name}', flush=True)
      command = [args.torch_python, 'benchmarks/simclr_torch_reference.py', '--train', train,
                 '--test', test, '--steps', str(args.steps), '--eval_every',
                 str(args.eval_every)] + (['--zero_init_residual'] if zero_init else [])
      command += args.torch_flags.split()
      output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
      print(output, flush=True)
      results[name] = {int(k): v for k, v in json.loads(output.splitlines()[-1])
                       ['knn_curve'].items()}
  for name, curve in results.items():
    print(f'{name:50s} ' + ' '.join(f'{step}:{acc:.3f}' for step, acc in sorted(curve.items())))
  print(json.dumps(results))


if __name__ == '__main__':
  main()
