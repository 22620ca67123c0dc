r"""float32 matmul rate at the GPT side-by-side shapes: XLA:CPU (jax) or PyTorch (issue 15).

  python benchmarks/matmul_bench.py                                  # jax, the project's venv
  /work/torchvenv/bin/python benchmarks/matmul_bench.py --backend torch  # PyTorch's venv

Times (M, K) @ (K, N) for the matmuls of one GPT step at nanoGPT's CPU shape
(12 x 64 = 768 tokens, width 128, MLP 512, vocabulary 1,024; forward and the
two gradient matmuls of each) and a 1024 square, in rounds of `--calls`
calls each waited for; prints the median time and GFLOP/s of each shape, then
a JSON line. Run the two backends one after the other on an idle machine
(it drifts up to 2x) and compare the rates; `taskset -c 0` pins either to
one core. jax's times include its dispatch (~0.02 ms a call). Uses only jax or
torch and numpy, so it runs in either venv.
"""

import argparse
import json
import statistics
import time

import numpy as np

SHAPES = ((768, 128, 128), (768, 128, 512), (768, 512, 128), (768, 128, 1024),
          (128, 768, 512), (512, 768, 128), (1024, 1024, 1024))


def matmul_fn(backend: str):
  """(make operands from numpy, run one waited-for matmul) for `backend`."""
  if backend == 'torch':
    import torch
    version = f'torch {torch.__version__}, {torch.get_num_threads()} threads'
    return torch.from_numpy, torch.mm, version
  import jax
  import jax.numpy as jnp
  dot = jax.jit(jnp.dot)
  return jnp.asarray, lambda a, b: dot(a, b).block_until_ready(), f'jax {jax.__version__}'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--backend', choices=('jax', 'torch'), default='jax')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--calls', type=int, default=50)
  args = parser.parse_args()
  to_array, matmul, version = matmul_fn(args.backend)
  rng = np.random.default_rng(0)
  results = []
  print(f'{version}: median of {args.rounds} rounds of {args.calls} calls')
  for m, k, n in SHAPES:
    a = to_array(rng.standard_normal((m, k), dtype=np.float32))
    b = to_array(rng.standard_normal((k, n), dtype=np.float32))
    for _ in range(5):
      matmul(a, b)
    times = []
    for _ in range(args.rounds):
      start = time.perf_counter()
      for _ in range(args.calls):
        matmul(a, b)
      times.append((time.perf_counter() - start) / args.calls)
    seconds = statistics.median(times)
    results.append({'m': m, 'k': k, 'n': n, 'ms': seconds * 1e3,
                    'gflop_s': 2 * m * k * n / seconds / 1e9})
    print(f'  ({m:4d}, {k:4d}) @ ({k:4d}, {n:4d}): {seconds * 1e3:7.3f} ms  '
          f'{results[-1]["gflop_s"]:6.0f} GFLOP/s')
  print(json.dumps({'backend': args.backend, 'version': version, 'results': results}))


if __name__ == '__main__':
  main()
