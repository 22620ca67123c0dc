r"""The same `python -m ssl_jax.bench` under several XLA_FLAGS settings, interleaved (issue 15).

Run from the repository root, in the project's venv:

  python -m benchmarks.xla_flags_sweep --config configs/gpt.py:local [--rounds 3] [--steps 10] \
      [--variant 'onednn=--xla_cpu_use_onednn=true' ...] [--config.KEY=VALUE ...]

Each variant is NAME=FLAGS (FLAGS appended to XLA_FLAGS; NAME 'default' adds
none and is always run). Every round runs each variant once, each in its own
process, in an order that rotates between rounds (this machine drifts up to 2x
between runs). The table gives the median step time over rounds, the spread,
the ratio to the default, and the loss after the timed steps (a variant that
changes the numbers shows here). Last stdout line: JSON.

Without --variant it tries the XLA:CPU switches this jaxlib offers for speed
(`XLA_FLAGS=--xla_cpu_scheduler_type=bogus python -c 'import jax; jax.devices()'`
lists them): oneDNN for matmuls and convolutions, XNNPACK off (on by
default), XNNPACK fusions of element-wise ops and reductions, unsafe fast
math, and single-threaded Eigen.
"""

import json
import os
import statistics
import sys

from absl import app, flags

from benchmarks.processes import run_json

DEFAULT_VARIANTS = (
    'onednn=--xla_cpu_use_onednn=true',
    'no_xnnpack=--xla_cpu_use_xnnpack=false',
    'xnn_fuse_all=--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce',
    'fast_math=--xla_cpu_enable_fast_math=true',
    'eigen_1thread=--xla_cpu_multi_thread_eigen=false',
)

_CONFIG = flags.DEFINE_string('config', None, 'Config file[:variant] for ssl_jax.bench.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds; each runs every variant once.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per run.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Warm-up steps per run.')
_VARIANTS = flags.DEFINE_multi_string('variant', list(DEFAULT_VARIANTS), 'NAME=XLA flags.')


def run_bench(extra_flags: str, overrides: list[str]) -> dict:
  """One `ssl_jax.bench` process with `extra_flags` appended to XLA_FLAGS; its JSON line."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} {extra_flags}'.strip()
  command = [sys.executable, '-m', 'ssl_jax.bench', f'--config={_CONFIG.value}',
             f'--warmup_steps={_WARMUP.value}', f'--steps={_STEPS.value}', *overrides]
  return run_json(command, env)


def main(argv, overrides: list[str]):
  del argv
  variants = {'default': ''}
  for spec in _VARIANTS.value:
    name, _, value = spec.partition('=')
    variants[name] = value
  names = list(variants)
  runs = {name: [] for name in names}
  for r in range(_ROUNDS.value):
    for name in names[r % len(names):] + names[:r % len(names)]:
      runs[name].append(run_bench(variants[name], overrides))
      print(f'round {r + 1} {name}: {runs[name][-1].get("step_time_s", runs[name][-1])}',
            file=sys.stderr, flush=True)
  summary = {}
  base = statistics.median(x['step_time_s'] for x in runs['default'] if 'step_time_s' in x)
  print(f'{_CONFIG.value}: step time, median over {_ROUNDS.value} rounds of {_STEPS.value} steps')
  print(f'{"variant":14s} {"ms (min-max)":>26s} {"vs default":>10s} {"loss":>9s}  flags')
  for name in names:
    times = [x['step_time_s'] for x in runs[name] if 'step_time_s' in x]
    if not times:
      print(f'{name:14s} failed: {runs[name][0]["error"]}')
      continue
    median = statistics.median(times)
    loss = runs[name][-1].get('loss')
    summary[name] = {'step_time_s': median, 'min': min(times), 'max': max(times),
                     'speedup': base / median, 'loss': loss, 'flags': variants[name]}
    print(f'{name:14s} {1e3 * median:10.1f} ({1e3 * min(times):.1f}-{1e3 * max(times):.1f})'
          f' {base / median:9.2f}x {loss if loss is None else f"{loss:9.4f}"}  {variants[name]}')
  print(json.dumps({'config': _CONFIG.value, 'rounds': _ROUNDS.value, 'summary': summary}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  # The --config.KEY=VALUE overrides go to ssl_jax.bench, not to absl's parser here.
  config_overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  sys.argv = [a for a in sys.argv if not a.startswith('--config.')]
  app.run(lambda argv: main(argv, config_overrides))
