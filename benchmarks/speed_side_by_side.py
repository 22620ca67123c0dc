r"""Training-step throughput, ssl_jax against PyTorch eager peers of the same recipes (issue 15).

Run from the repository root, in the project's venv:

  python -m benchmarks.speed_side_by_side --torch_python /work/torchvenv/bin/python \
      [--rounds 3] [--workloads gpt,simclr,mae] [--steps 10] [--warmup 3] \
      [--out /tmp/speed_sbs] [--torch_threads N] [--bfloat16] [--peer_keeps_freed_memory] \
      [--peer_reads_images]

For each round and workload it runs, each in its own process and one at a
time, `python -m ssl_jax.bench` (the trainer's own jitted step, see
ssl_jax/bench.py) and benchmarks/torch_peers.py under --torch_python (a venv
with torch and kornia), alternating which goes first from round to round so
that neither always runs on a machine warmed or loaded by the other. Each
prints a JSON object as its last stdout line; this script reads
`examples_per_s` (and `tokens_per_s` for gpt) from both and prints, per
workload, the median over rounds with the min-max range and the ratio of the
medians ssl_jax / PyTorch (> 1: ssl_jax is faster), then a JSON object as its
last line. `ssl_jax.bench` sets glibc's malloc to keep freed memory
(`ssl_jax.host_memory`), as every ssl_jax entry point does; the peers run as
their authors run them, with glibc's defaults, and with
--peer_keeps_freed_memory also a third time, as `pytorch_kept`, under the same
settings given as MALLOC_* environment variables. ssl_jax's time includes
XLA's compile only in its separate `compile_s`, never in the step times;
PyTorch eager compiles nothing; both skip --warmup steps before timing
--steps.

The three recipes, each the same model, batch and optimizer on both sides:
  gpt     nanoGPT's CPU recipe (4 layers, 128 wide, 4 heads, context 64, batch
          12, AdamW), vocabulary 1024 (configs/gpt.py:local's BPE), with
          nanoGPT's model: no biases (train.py L56), exact GELU (model.py L83).
  simclr  ResNet-18 at a quarter width with the CIFAR stem, projection
          128 -> 512 -> 128, NT-Xent, SGD momentum, batch 256, 32 px RGB views
          made on the batch inside the step (kornia on the PyTorch side); the
          overrides of benchmarks/simclr_side_by_side.py.
  mae     configs/mae_vit.py:local's ViT (4 blocks of 128, 4 heads, MLP 256,
          patch 4; decoder 64 wide, 2 blocks) on 32 px RGB, batch 128, mask
          0.75, norm_pix_loss, AdamW.
The images for ssl_jax's simclr and mae are OUT/train.npz, scikit-learn's
digits upsampled to 32x32 RGB (simclr_side_by_side.write_data), written once;
the PyTorch peers draw random tensors of the same shapes. With
--peer_reads_images the mae peer reads OUT/train.npz too, through MAE's own
DataLoader and crops (benchmarks/torch_mae_data.py) fetched inside its
timed step, as ssl_jax's bench fetches each batch from its host pipeline:
then both sides pay for cropping on the same cores.

Both sides compute in float32, as the peers' authors run them on a CPU.
--bfloat16 puts both in bfloat16 with float32 parameters: ssl_jax's
model.dtype and torch.autocast('cpu', torch.bfloat16) around each step.

Run it on an otherwise idle machine. PyTorch's OpenMP pool (one thread a
physical core by default) waits at every op's barrier for all its threads, so
when another process holds a core each small op stalls for milliseconds: on a
busy 2-core host the gpt peer took 2.1 s a step with 2 threads and 0.10 s with
1. Where the host cannot be kept idle, also run with --torch_threads 1 and
report both.
"""

import argparse
import json
import os
import sys

import numpy as np

from benchmarks.processes import run_json
from benchmarks.simclr_side_by_side import write_data
from ssl_jax import host_memory

SIMCLR_OVERRIDES = {  # benchmarks/simclr_side_by_side.py's recipe, less its evals.
    'data.batch_size': 256, 'data.image_size': 32, 'data.num_workers': 0, 'augment.size': 32,
    'augment.jitter_strength': 0.5, 'augment.blur_prob': 0.0, 'model.depth': 18,
    'model.stem': 'cifar', 'model.width_multiplier': 0.25, 'model.projection_hidden': 512,
    'model.projection_dim': 128, 'model.temperature': 0.5, 'model.dtype': 'float32',
    'model.zero_init_residual': False, 'optim.name': 'sgd', 'optim.lr': 0.06,
    'optim.lr_scaling': 'none', 'optim.weight_decay': 5e-4, 'optim.warmup_steps': 0,
}
GPT_OVERRIDES = {  # nanoGPT README L85's CPU shape, and nanoGPT's model (no bias, erf GELU).
    'data.seq_len': 64, 'model.max_len': 64, 'data.batch_size': 12,
    'model.use_bias': False, 'model.gelu': 'erf',
}
MAE_OVERRIDES = {  # mae_vit.py:local on 32 px RGB instead of 16 px grey digits.
    'data.image_size': 32, 'data.channels': 3, 'data.batch_size': 128,
    'data.mean': '(0.5,0.5,0.5)', 'data.std': '(0.5,0.5,0.5)',
}


def ours_command(workload: str, train: str, warmup: int, steps: int,
                 dtype: str = 'float32') -> list[str]:
  """`python -m ssl_jax.bench` for `workload` with the side-by-side overrides, in `dtype`."""
  if workload == 'gpt':
    config, overrides = 'configs/gpt.py:local', GPT_OVERRIDES
  elif workload == 'simclr':
    config, overrides = 'configs/simclr_resnet.py:cifar10', {
        'data.source': f'npz:{train}', **SIMCLR_OVERRIDES}
  else:
    config, overrides = 'configs/mae_vit.py:local', {
        'data.source': f'npz:{train}', **MAE_OVERRIDES}
  overrides = {**overrides, 'model.dtype': dtype}
  return ([sys.executable, '-m', 'ssl_jax.bench', f'--config={config}',
           f'--warmup_steps={warmup}', f'--steps={steps}']
          + [f'--config.{k}={v}' for k, v in overrides.items()])


def torch_command(python: str, workload: str, warmup: int, steps: int,
                  threads: int | None, dtype: str = 'float32',
                  images: str | None = None) -> list[str]:
  """benchmarks/torch_peers.py for `workload` under the torch venv's `python`.

  `images`: an npz the mae peer reads through MAE's DataLoader (else random batches).
  """
  here = os.path.dirname(os.path.abspath(__file__))
  return ([python, os.path.join(here, 'torch_peers.py'), '--workload', workload,
           '--warmup', str(warmup), '--steps', str(steps)]
          + (['--threads', str(threads)] if threads else [])
          + (['--autocast', dtype] if dtype != 'float32' else [])
          + (['--images', images] if images and workload == 'mae' else []))


def spread(values: list[float]) -> dict[str, float]:
  """Median, min and max of `values`."""
  return {'median': float(np.median(values)), 'min': min(values), 'max': max(values)}


def ratio_key(peer: str) -> str:
  """Where the summary keeps ssl_jax's ratio to `peer`: 'ratio' for 'pytorch', else 'ratio_PEER'."""
  return 'ratio' if peer == 'pytorch' else f'ratio_{peer}'


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict[str, dict]:
  """workload -> per side and metric the spread over rounds, and ssl_jax's ratio to each peer."""
  summary = {}
  for workload, sides in runs.items():
    entry = {}
    for metric in ('examples_per_s', 'tokens_per_s'):
      if all(metric in r for side in sides.values() for r in side):
        entry[metric] = {side: spread([r[metric] for r in results])
                         for side, results in sides.items()}
        for peer in (side for side in sides if side != 'ssl_jax'):
          entry[metric][ratio_key(peer)] = (
              entry[metric]['ssl_jax']['median'] / entry[metric][peer]['median'])
    entry['step_time_s'] = {side: spread([r['step_time_s'] for r in results])
                            for side, results in sides.items()}
    summary[workload] = entry
  return summary


def table(summary: dict[str, dict]) -> list[str]:
  """Human-readable lines: median (min-max) per side and ssl_jax's ratio, per workload, metric
  and peer (`pytorch_kept`: the peer with the same malloc settings as ssl_jax)."""
  lines = [f"{'workload':8} {'metric':14} {'peer':13} {'ssl_jax median (min-max)':>28} "
           f"{'peer median (min-max)':>28} {'ssl_jax/peer':>13}"]
  for workload, entry in summary.items():
    for metric in ('examples_per_s', 'tokens_per_s'):
      if metric in entry:
        m = entry[metric]
        for peer in (side for side in m if side.startswith('pytorch')):
          ratio = m[ratio_key(peer)]
          cells = [f"{m[s]['median']:.1f} ({m[s]['min']:.1f}-{m[s]['max']:.1f})"
                   for s in ('ssl_jax', peer)]
          lines.append(f"{workload:8} {metric:14} {peer:13} {cells[0]:>28} {cells[1]:>28} "
                       f"{ratio:>13.2f}")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--torch_python', required=True, help='python of a venv with torch, kornia')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--workloads', default='gpt,simclr,mae')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--out', default='/tmp/speed_side_by_side', help='where train.npz goes')
  parser.add_argument('--torch_threads', type=int, default=None, help="default: torch's own")
  parser.add_argument('--bfloat16', action='store_true',
                      help='both sides compute in bfloat16 (float32 parameters)')
  parser.add_argument('--peer_keeps_freed_memory', action='store_true',
                      help="also run each PyTorch peer with ssl_jax's malloc settings "
                           "(ssl_jax.host_memory), as a third side 'pytorch_kept'")
  parser.add_argument('--peer_reads_images', action='store_true',
                      help="the mae peer reads OUT/train.npz through MAE's DataLoader and "
                           'crops, as ssl_jax reads it, instead of drawing random tensors')
  args = parser.parse_args()
  dtype = 'bfloat16' if args.bfloat16 else 'float32'
  workloads = args.workloads.split(',')
  unknown = set(workloads) - {'gpt', 'simclr', 'mae'}
  if unknown:
    parser.error(f'unknown workloads {sorted(unknown)}')
  train = os.path.join(args.out, 'train.npz')
  if not os.path.exists(train):
    train, _ = write_data(args.out)
  sides = ['ssl_jax', 'pytorch'] + (['pytorch_kept'] if args.peer_keeps_freed_memory else [])
  runs = {w: {side: [] for side in sides} for w in workloads}
  environments = {'pytorch_kept': {**os.environ, **host_memory.ENVIRONMENT}}  # Else inherited.
  for round_ in range(args.rounds):
    for workload in workloads:
      peer = torch_command(args.torch_python, workload, args.warmup, args.steps,
                           args.torch_threads, dtype, train if args.peer_reads_images else None)
      commands = {'ssl_jax': ours_command(workload, train, args.warmup, args.steps, dtype),
                  'pytorch': peer, 'pytorch_kept': peer}
      order = sides if round_ % 2 == 0 else sides[::-1]
      for side in order:
        result = run_json(commands[side], env=environments.get(side))
        if 'error' in result:
          raise SystemExit(f"error: {result['error']}")
        runs[workload][side].append(result)
        print(f"round {round_} {workload:6} {side:7} {result['examples_per_s']:.1f} examples/s "
              f"(step {1e3 * result['step_time_s']:.1f} ms)", flush=True)
  summary = summarize(runs)
  for line in table(summary):
    print(line)
  print(json.dumps({'rounds': args.rounds, 'steps': args.steps, 'warmup': args.warmup,
                    'dtype': dtype, 'peer_reads_images': args.peer_reads_images,
                    'summary': summary, 'runs': runs}), flush=True)


if __name__ == '__main__':
  main()
