r"""A convolution's forward, input and kernel gradients, YNNPACK's against Eigen's (issue 15).

  python -m benchmarks.conv_bench [--batch 512] [--rounds 5]

XLA:CPU (jaxlib 0.10.2) runs convolutions through YNNPACK by default;
`ssl_jax.xla_options.step_options()` takes them out of YNNPACK, so XLA runs
them with Eigen. For the 3x3 convolutions of the SimCLR CIFAR workload's
ResNet-18 (width 16, 32 px; batch 512 = two views of 256), this jits each
part two ways in one process, `compiler_options` apart: XLA's default,
and the train step's options. The parts are the forward pass, the input
gradient (dx) and the kernel gradient (dW, a convolution whose window is
the whole image). Rounds alternate; the table gives median milliseconds and
the largest relative difference of the results. Last stdout line: JSON.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from ssl_jax import host_memory, xla_options

# (batch-free input shape, output channels, stride) of the workload's 3x3 convolutions.
SHAPES = ((32, 32, 16, 16, 1), (32, 32, 16, 32, 2), (16, 16, 32, 32, 1), (8, 8, 64, 64, 1),
          (4, 4, 128, 128, 1))


def conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
  """A 3x3 NHWC convolution with torch's padding 1, as the ResNet's."""
  return lax.conv_general_dilated(x, w, (stride, stride), [(1, 1), (1, 1)],
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def parts(stride: int) -> dict:
  """The three computations of one convolution in a train step, as functions of (x, w, dy)."""
  return {
      'forward': lambda x, w, dy: conv(x, w, stride),
      'dx': lambda x, w, dy: jax.vjp(lambda x: conv(x, w, stride), x)[1](dy)[0],
      'dW': lambda x, w, dy: jax.vjp(lambda w: conv(x, w, stride), w)[1](dy)[0],
  }


def time_shape(batch: int, shape: tuple, rounds: int, options: dict) -> dict:
  """Median seconds of each part under the default and under `options`, and their difference."""
  h, w_, c, o, stride = shape
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (batch, h, w_, c))
  w = jax.random.normal(kw, (3, 3, c, o)) / (3 * c ** 0.5)
  dy = jax.random.normal(kd, (batch, h // stride, w_ // stride, o))
  result = {}
  for part, fn in parts(stride).items():
    sides = {'default': jax.jit(fn), 'step_options': jax.jit(fn, compiler_options=options)}
    outs = {name: jax.block_until_ready(f(x, w, dy)) for name, f in sides.items()}
    diff = float(jnp.abs(outs['default'] - outs['step_options']).max()
                 / jnp.abs(outs['default']).max())
    times = {name: [] for name in sides}
    for _ in range(rounds):
      for name, f in sides.items():
        start = time.perf_counter()
        jax.block_until_ready(f(x, w, dy))
        times[name].append(time.perf_counter() - start)
    result[part] = {name: statistics.median(t) for name, t in times.items()} | {
        'relative_difference': diff}
  return result


def main():
  host_memory.keep_freed_memory()  # As the entry points do, before jax starts its backend.
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=512)
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args()
  options = xla_options.step_options('cpu')
  if options is None:
    raise SystemExit('step_options() sets nothing on this jaxlib or XLA_FLAGS: nothing to compare')
  print(f'batch {args.batch}, 3x3 convolutions; ms, median of {args.rounds} alternating rounds; '
        f'options {options}')
  print(f'{"input (H, W, C) -> C_out, stride":34s} {"part":8s} {"default":>9s} '
        f'{"options":>9s} {"speedup":>8s} {"rel. diff":>10s}')
  rows = []
  for shape in SHAPES:
    for part, r in time_shape(args.batch, shape, args.rounds, options).items():
      name = f'({shape[0]}, {shape[1]}, {shape[2]}) -> {shape[3]}, /{shape[4]}'
      print(f'{name:34s} {part:8s} {1e3 * r["default"]:9.1f} {1e3 * r["step_options"]:9.1f} '
            f'{r["default"] / r["step_options"]:7.2f}x {r["relative_difference"]:10.1e}',
            flush=True)
      rows.append({'shape': shape, 'part': part, **r})
  print(json.dumps({'batch': args.batch, 'options': options, 'rows': rows}))


if __name__ == '__main__':
  main()
