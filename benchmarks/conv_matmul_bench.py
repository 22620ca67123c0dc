r"""ResNet convolutions as shifted slices times a matmul, against XLA's convolution (issue 15).

  python -m benchmarks.conv_matmul_bench [--batch 256] [--rounds 5]

Builds the SimCLR workload's encoder (ResNet-18, CIFAR stem, width 16, 32 px RGB)
twice: once with XLA's `conv_general_dilated`, once with every nnx.Conv's
convolution replaced by `shifted_matmul_conv`: the input padded, k x k shifted
(strided) slices concatenated on the channel axis, and one matmul with the
kernel reshaped to (k k C_in, C_out) (im2col without a gather; its gradient is
pads and adds). Both sides' loss and gradients are compared, then forward +
backward of a BatchNorm-train pass is timed in alternation. Last line: JSON.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from ssl_jax import host_memory, sharding
from ssl_jax.models.resnet import ResNet


def shifted_matmul_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                        rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                        precision=None, **kwargs):
  """`lax.conv_general_dilated` for NHWC x HWIO, no dilation or groups, as slices + matmul."""
  del lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, kwargs
  kh, kw, c_in, c_out = rhs.shape
  sh, sw = window_strides
  x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  cols = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  return jnp.einsum('bhwk,ko->bhwo', patches, rhs.reshape(kh * kw * c_in, c_out),
                    precision=precision)


def loss_and_grads(impl: str):
  """A jitted (params, rest, images) -> (loss, grads) of the encoder with `impl` convs."""
  model = ResNet(18, stem='cifar', width_multiplier=0.25, channels=3, rngs=nnx.Rngs(0))
  if impl == 'matmul':
    for _, module in nnx.iter_graph(model):
      if isinstance(module, nnx.Conv):
        module.conv_general_dilated = shifted_matmul_conv
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, rest, images):
    out = nnx.merge(graphdef, params, rest, copy=True)(images, train=True)
    return (out['pooled'] ** 2).mean()

  return jax.jit(jax.value_and_grad(loss)), params, rest


def main():
  host_memory.keep_freed_memory()  # As the entry points do, before jax starts its backend.
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args()
  images = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
  mesh = sharding.make_mesh(sharding.mesh_config(1, 1, 1), jax.devices()[:1])
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    sides = {impl: loss_and_grads(impl) for impl in ('xla', 'matmul')}
    results = {impl: fn(params, rest, images) for impl, (fn, params, rest) in sides.items()}
    grad_diff = max(float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(results['xla'][1]), jax.tree.leaves(results['matmul'][1]), strict=True))
    times = {impl: [] for impl in sides}
    for _ in range(args.rounds):
      for impl, (fn, params, rest) in sides.items():
        start = time.perf_counter()
        for _ in range(3):
          jax.block_until_ready(fn(params, rest, images))
        times[impl].append((time.perf_counter() - start) / 3)
  medians = {impl: statistics.median(t) for impl, t in times.items()}
  print(f'ResNet-18 w16, CIFAR stem, batch {args.batch} x 32 x 32 x 3: forward + backward')
  for impl, t in times.items():
    print(f'{impl:7s} {1e3 * medians[impl]:8.1f} ms (min {1e3 * min(t):.1f}, '
          f'max {1e3 * max(t):.1f})')
  print(f'loss {float(results["xla"][0]):.6f} vs {float(results["matmul"][0]):.6f}; '
        f'largest gradient difference {grad_diff:.2e}')
  print(json.dumps({'batch': args.batch, 'seconds': medians, 'grad_max_diff': grad_diff,
                    'matmul_over_xla': medians['matmul'] / medians['xla']}))


if __name__ == '__main__':
  main()
