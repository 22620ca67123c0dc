r"""PyTorch's CPU attention, forward + backward, at benchmarks/attention_bench.py's shapes.

  /work/torchvenv/bin/python benchmarks/attention_torch.py [--batch 128 --length 65 \
      --heads 4 --head_dim 16] [--causal] [--rounds 5 --steps 10]

The peer side of `python -m benchmarks.attention_bench` (issue 15): random
(B, T, heads, head_dim) queries, keys and values of the same shapes (not the same
numbers) and the same kind of scalar (the output weighted by a fixed random
array, summed), differentiated with respect to all three. `sdpa` is
`F.scaled_dot_product_attention`, what the MAE and GPT peers of
`benchmarks/torch_peers.py` call (timm's `fused_attn`, nanoGPT's flash path);
`explicit` is the softmax of two matmuls (timm's path without it). Both take
q, k and v as (B, heads, T, E) views of the (B, T, heads, E) arrays, as the
peers' `Attention` does. Rounds alternate the two (`alternating.py`, beside
this script); prints the median of each, then a JSON line. Uses only torch and
that pure-Python helper: run it in the PyTorch venv, right after
attention_bench in the project's, on an idle machine (it drifts up to 2x), and
compare.
"""

import argparse
import json
import os
import sys

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import alternating  # noqa: E402  (pure Python, beside this script)


def explicit(q, k, v, causal):
  """softmax(q k^T / sqrt(E)) v, the masked scores at -inf."""
  scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
  if causal:
    t = scores.shape[-1]
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float('-inf'))
  return scores.softmax(-1) @ v


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--length', type=int, default=65)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--head_dim', type=int, default=16)
  parser.add_argument('--causal', action='store_true')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  shape = (args.batch, args.length, args.heads, args.head_dim)
  generator = torch.Generator().manual_seed(0)
  q, k, v = (torch.randn(shape, generator=generator, requires_grad=True) for _ in range(3))
  w = torch.randn(shape, generator=generator).transpose(1, 2)
  kernels = {
      'sdpa': lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal),
      'explicit': lambda q, k, v: explicit(q, k, v, args.causal),
  }

  def step(kernel):
    q.grad = k.grad = v.grad = None
    (kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) * w).sum().backward()
    return [x.grad.clone() for x in (q, k, v)]

  grads = {name: step(kernel) for name, kernel in kernels.items()}
  difference = max(float((a - b).abs().max()) for a, b in zip(*grads.values(), strict=True))
  times = alternating.time_rounds(
      {name: lambda kernel=kernel: step(kernel) for name, kernel in kernels.items()},
      args.rounds, args.steps)
  result = alternating.report(times)
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; largest gradient '
        f'difference {difference:.2e}')
  print(json.dumps({'shape': shape, 'causal': args.causal, 'step_time_s': result,
                    'max_grad_difference': difference}))


if __name__ == '__main__':
  main()
