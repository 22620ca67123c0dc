r"""MFU of GPT-2 124M and MAE ViT-B on one GPU: issue 15's device check, in one call.

  python -m benchmarks.gpu_mfu --out DIR [--data DIR] [--budget_s 330] [--only NAME,...]
      [--no_ceiling] [--smoke]

Runs `python -m ssl_jax.bench` (the trainer's own jitted step, input
pipeline included) for each workload of WORKLOADS in that order, each in its
own process under a time limit, and starts no new one once --budget_s is
spent. Each run's output goes to DIR/NAME.log; DIR/results.jsonl gets one
JSON object a run. The table printed last gives, per run, the median step
time, throughput, MFU (analytic FLOPs over the device's dense bf16 spec-sheet
peak, `metrics.PEAK_FLOPS`), the same MFU against a bf16 8192^3 matmul
measured first in this call, the MFU the step would reach with no input wait
(the bench waits for every batch, the trainer overlaps it), input wait, peak
memory and compile time.

Data, all made on the machine (nothing is downloaded):
  gpt  configs/gpt.py (GPT-2 124M, bf16, context 1024) on the pydoc text,
       with a 50257-entry BPE trained on it at start; the embedding is
       padded to 50304 entries, as nanoGPT pads GPT-2's 50257 to a multiple
       of 64 (karpathy/nanoGPT@3adf61e model.py L111, train.py L155).
  mae  configs/mae_vit.py (ViT-B/16, decoder 512 x 8, mask 0.75, bf16) on
       DATA/mae224.npz (--data, default --out), 2048 random 224 px RGB
       images; the host pipeline cuts the recipe's RandomResizedCrop(0.2-1,
       bicubic) and flips, as in training.
--smoke shrinks every model and batch to run on a CPU in a minute: it checks
this script, not the numbers.

On a machine whose image has its own jax (the H200 of docs/benchmarks.md had
jax 0.11.2 and flax 0.12.10, under which the pinned flax 0.12.8 does not
import), use its jax and flax and add only what it lacks: there,
ml_collections, grain, array_record and portpicker, as wheels on PYTHONPATH.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from benchmarks.processes import run_json

GPT = ['--config=configs/gpt.py', '--config.data.source=pydoc',
       '--config.model.vocab_size=50304']
MAE = ['--config=configs/mae_vit.py', '--config.data.source=npz:{data}/mae224.npz',
       '--config.data.num_workers=16']
TIMED = ['--warmup_steps=5', '--steps=20']
# (name, bench arguments), most wanted first: the budget may end the list early. The
# `_ops` runs trace 3 more steps and list the longest kernels (`--top_ops`, which turns
# XLA:GPU's CUDA graphs off for the run: with them a step traces as one op).
WORKLOADS = [
    ('gpt_b64', GPT + ['--config.data.batch_size=64'] + TIMED),
    ('mae_b256', MAE + ['--config.data.batch_size=256'] + TIMED),
    ('mae_b256_ops', MAE + ['--config.data.batch_size=256', '--top_ops=25'] + TIMED),
    ('gpt_b64_ops', GPT + ['--config.data.batch_size=64', '--top_ops=25'] + TIMED),
    ('mae_b64', MAE + ['--config.data.batch_size=64'] + TIMED),
    ('gpt_b16', GPT + ['--config.data.batch_size=16'] + TIMED),
]
SMOKE = {  # Appended under --smoke: later flags win.
    'gpt': ['--config.model.depth=1', '--config.model.width=64', '--config.model.num_heads=2',
            '--config.model.mlp_dim=128', '--config.data.seq_len=64',
            '--config.model.max_len=64', '--config.data.batch_size=2'],
    'mae': ['--config.model.depth=1', '--config.model.decoder_depth=1',
            '--config.data.batch_size=4', '--config.data.num_workers=2'],
}
CEILING = ('from ssl_jax import step_bench; import jax, jax.numpy as jnp, json; '
           'rate, size = step_bench.matmul_ceiling(sizes={sizes}, repeats=10, dtype=jnp.bfloat16); '
           'print(json.dumps({{"matmul_flops_per_s": rate, "size": size, '
           '"device": jax.devices()[0].device_kind, "jax": jax.__version__}}))')


def write_images(path: str, count: int, size: int = 224) -> None:
  """`count` random uint8 RGB images of `size` px, as the `npz:` source reads them."""
  if not os.path.exists(path):
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8))


def row(name: str, r: dict, ceiling: float | None) -> str:
  """One line of the summary table."""
  if 'error' in r:
    return f'{name:24s} ERROR {r["error"][-160:]}'
  rate = (f"{r['tokens_per_s']:,.0f} tok/s" if 'tokens_per_s' in r
          else f"{r['examples_per_s']:,.0f} img/s")
  wait = r['input_wait_fraction']
  mfu = r['mfu'] or 0.0
  measured = mfu * r['peak_flops_per_device'] / ceiling if ceiling else float('nan')
  memory = (r.get('peak_memory_bytes') or 0) / 2 ** 30
  return (f"{name:24s} {r['batch_size']:5d} {1e3 * r['step_time_s']:8.1f} {rate:>16s} "
          f"{100 * mfu:6.1f}% {100 * measured:7.1f}% {100 * mfu / (1 - wait):8.1f}% "
          f"{100 * wait:6.1f}% {memory:7.1f} {r['compile_s']:7.1f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='Folder for logs, data and results.')
  parser.add_argument('--data', default=None, help='Folder for the images (default: --out).')
  parser.add_argument('--budget_s', type=float, default=330.0,
                      help='Start no run after this many seconds.')
  parser.add_argument('--timeout_s', type=float, default=140.0, help='Limit of one run.')
  parser.add_argument('--only', default='', help='Comma-separated workload names.')
  parser.add_argument('--smoke', action='store_true', help='Tiny models, on a CPU.')
  parser.add_argument('--no_ceiling', action='store_true', help='Skip the matmul ceiling.')
  args = parser.parse_args()
  start = time.monotonic()
  data = args.data or args.out
  for folder in (args.out, data):
    os.makedirs(folder, exist_ok=True)
  write_images(f'{data}/mae224.npz', 64 if args.smoke else 2048)
  sizes = (256, 512) if args.smoke else (4096, 8192)
  ceiling_run = {} if args.no_ceiling else run_json(
      [sys.executable, '-c', CEILING.format(sizes=sizes)], timeout=120,
      log=f'{args.out}/ceiling.log')
  print(json.dumps(ceiling_run), flush=True)
  ceiling = ceiling_run.get('matmul_flops_per_s')
  wanted = set(filter(None, args.only.split(',')))
  results = []
  for name, flags in WORKLOADS:
    if wanted and name not in wanted:
      continue
    if time.monotonic() - start > args.budget_s:
      print(f'{name}: not run, the {args.budget_s:.0f} s budget is spent', flush=True)
      continue
    flags = [flag.format(data=data) for flag in flags]
    if args.smoke:
      flags += SMOKE[name.split('_')[0]]
    began = time.monotonic()
    result = run_json([sys.executable, '-m', 'ssl_jax.bench', *flags],
                      timeout=args.timeout_s, log=f'{args.out}/{name}.log')
    result.update(name=name, wall_s=time.monotonic() - began, flags=flags)
    results.append(result)
    with open(f'{args.out}/results.jsonl', 'a') as f:
      f.write(json.dumps(result) + '\n')
    print(f"{name}: {result.get('error') or 'ok'} ({result['wall_s']:.0f} s)", flush=True)
  print(f"\nbf16 matmul ceiling: {(ceiling or 0) / 1e12:.0f} TFLOP/s "
        f"({ceiling_run.get('size')}^3 on {ceiling_run.get('device')}, jax "
        f"{ceiling_run.get('jax')}); MFU vs spec-sheet peak, vs that ceiling, and with no "
        'input wait (spec)')
  print(f"{'run':24s} {'batch':>5s} {'step ms':>8s} {'throughput':>16s} {'MFU':>7s} "
        f"{'vs mm':>8s} {'no wait':>9s} {'wait':>7s} {'GiB':>7s} {'compile':>7s}")
  for result in results:
    print(row(result['name'], result, ceiling))
    for op in result.get('top_ops') or []:
      print(f"    {1e3 * op['s_per_step']:8.2f} ms {100 * op['share']:5.1f}% {op['op'][:40]:40s} "
            f"{op['shape_and_source'][:90]}")


if __name__ == '__main__':
  main()
