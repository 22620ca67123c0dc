r"""How much of a rematerialised block XLA keeps for the backward pass, by its buffer plan.

  python -m benchmarks.remat_memory [--width 256] [--tokens 128] [--batch 64]

Compiles the gradient of a mean-square loss of `models.transformer.Transformer`
at two depths (4 and 8 blocks) for each `model.remat` policy and XLA:CPU
scheduler, and prints the temporaries per block (the difference between the
depths over 4) from `compiled.memory_analysis()`, beside what a block's
activations weigh and what 'full' should keep (the block's input).
`ssl_jax.dry_run` reads the same buffer plan: this shows how far it can be
trusted for remat (README, "Big models and dry runs"). Last line: JSON.
"""

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from ssl_jax import sharding
from ssl_jax.models.transformer import Transformer

SCHEDULERS = {'default': {},
              'memory': {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}}


def temp_bytes(args, depth: int, remat: str, options: dict) -> int:
  """Temporaries of the compiled gradient of a `depth`-block transformer."""
  model = Transformer(args.width, depth, 4, 4 * args.width, dtype=jnp.float32, remat=remat,
                      rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss(params, x):
    out, _ = nnx.merge(graphdef, params)(x)
    return (out ** 2).mean()

  x = jax.ShapeDtypeStruct((args.batch, args.tokens, args.width), jnp.float32)
  compiled = jax.jit(jax.grad(loss)).lower(params, x).compile(compiler_options=options)
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--width', type=int, default=256)
  parser.add_argument('--tokens', type=int, default=128)
  parser.add_argument('--batch', type=int, default=64)
  args = parser.parse_args()
  mib = 2 ** 20
  residual = args.batch * args.tokens * args.width * 4
  scores = args.batch * 4 * args.tokens ** 2 * 4
  # x, 2 norms, qkv (3), attention output, projection, MLP out (1 each), hidden + GELU (4 each).
  block = 13 * residual + 2 * scores
  print(f'one block: input {residual / mib:.0f} MiB, all activations ~{block / mib:.0f} MiB '
        f'(f32, batch {args.batch} x {args.tokens} tokens x {args.width})')
  rows = {}
  mesh = sharding.make_mesh(sharding.mesh_config(1, 1, 1), jax.devices()[:1])
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    for scheduler, options in SCHEDULERS.items():
      for remat in ('none', 'full', 'dots'):
        shallow, deep = (temp_bytes(args, d, remat, options) for d in (4, 8))
        rows[f'{scheduler}/{remat}'] = per_block = (deep - shallow) / 4
        print(f'scheduler {scheduler:8s} remat {remat:5s}: {per_block / mib:7.1f} MiB a block '
              f'({deep / mib:.0f} MiB at depth 8)')
  print(json.dumps({'block_input_bytes': residual, 'block_activation_bytes': block,
                    'temp_bytes_per_block': rows}))


if __name__ == '__main__':
  main()
