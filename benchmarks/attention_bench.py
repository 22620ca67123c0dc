r"""Attention forward + backward: jax.nn.dot_product_attention's XLA kernel vs two einsums.

  python -m benchmarks.attention_bench [--batch 128 --length 65 --heads 4 --head_dim 16] \
      [--rounds 5 --steps 10]

The default shape is MAE's decoder in the issue 15 side-by-side workload
(`:local` on 32 px: 64 patches + [CLS], 4 heads of 16, batch 128). Both
sides take the same (B, T, heads, head_dim) queries, keys and values and
differentiate the same scalar; `einsums` is `ssl_jax.models.transformer.attend`
(the softmax of two einsums), `jax_xla` is
`jax.nn.dot_product_attention(..., implementation='xla')`. Rounds alternate
the two; prints the median step of each and the largest gradient difference,
then a JSON line.
"""

import json

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import alternating
from ssl_jax import host_memory
from ssl_jax.models.transformer import attend

_BATCH = flags.DEFINE_integer('batch', 128, 'Batch.')
_LENGTH = flags.DEFINE_integer('length', 65, 'Tokens.')
_HEADS = flags.DEFINE_integer('heads', 4, 'Heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 16, 'Width of a head.')
_CAUSAL = flags.DEFINE_bool('causal', False, 'Causal mask (GPT).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Alternating rounds.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed calls a round.')


def main(argv):
  del argv
  host_memory.keep_freed_memory()  # As the entry points do, before jax starts its backend.
  shape = (_BATCH.value, _LENGTH.value, _HEADS.value, _HEAD_DIM.value)
  q, k, v, w = (jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(0), 4))
  causal = _CAUSAL.value
  kernels = {
      'einsums': lambda q, k, v: attend(q, k, v, causal=causal)[0],
      'jax_xla': lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=causal, implementation='xla'),
  }
  steps = {name: jax.jit(jax.value_and_grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w),
                                            argnums=(0, 1, 2)))
           for name, f in kernels.items()}
  grads = {name: step(q, k, v)[1] for name, step in steps.items()}
  difference = max(float(jnp.abs(a - b).max())
                   for a, b in zip(grads['einsums'], grads['jax_xla'], strict=True))
  times = alternating.time_rounds(
      {name: lambda step=step: jax.block_until_ready(step(q, k, v))
       for name, step in steps.items()}, _ROUNDS.value, _STEPS.value)
  result = alternating.report(times)
  print(f'jax_xla / einsums: {result["jax_xla"] / result["einsums"]:.2f}x; '
        f'largest gradient difference {difference:.2e}')
  print(json.dumps({'shape': shape, 'causal': causal, 'step_time_s': result,
                    'max_grad_difference': difference}))


if __name__ == '__main__':
  app.run(main)
