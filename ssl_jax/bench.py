r"""Benchmarks a config's real train step: step time, throughput, FLOPs, MFU, input wait.

  python -m ssl_jax.bench --config=configs/X.py[:VARIANT] [--warmup_steps=3 --steps=10] \
      [--top_ops=N] [--config.KEY=VALUE ...]

Builds the trainer's step (`ssl_jax.step_bench`: same data, optimizer,
shardings and jitted step as `ssl_jax.main`) in a temporary workdir that is
removed afterwards, compiles it apart, runs the warm-up and measured steps
and prints a table; the last stdout line is the same as JSON (`step_time_s`,
`flops_per_step`, `mfu`, ...). `--top_ops=N` traces 3 more steps with
`jax.profiler` and lists the N compiled HLO ops that took longest, each with
its shape and the jax operation it came from, then the same time summed by
kind of op (YNNPACK fusions, Eigen dots, layout copies, ...): where the time
goes, and the share of the traced timeline during which any named op ran (what the list
cannot see: XLA:CPU's Eigen convolutions, host gaps). It also
turns off XLA:GPU's CUDA graphs for the run (`profiling.flags_for_trace`), so that on a
GPU each kernel is its own op rather than one graph for the step. MFU
is the model's analytic FLOPs over the device's dense bf16 peak
(`metrics.PEAK_FLOPS`), or, on a CPU, over the best float32 matmul rate
measured in the same run.
"""

import json
import math
import os
import sys
import tempfile
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from ssl_jax import cli, host_memory
from ssl_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with a variant: configs/mae_vit.py:local.',
    lock_config=True)
_WARMUP_STEPS = flags.DEFINE_integer('warmup_steps', 3, 'Steps run before timing (not counted).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_TOP_OPS = flags.DEFINE_integer(
    'top_ops', 0, 'Also trace 3 steps after the timed ones and list the N compiled HLO ops '
    'that took longest (time per step, share, shape and the jax source of each).')
TRACE_STEPS = 3
KINDS_SHOWN = 8  # Op kinds in the table; the JSON has them all.
flags.mark_flags_as_required(['config'])

USAGE = ('python -m ssl_jax.bench --config=configs/X.py[:VARIANT] [--warmup_steps=N] '
         '[--steps=N] [--top_ops=N] [--config.KEY=VALUE ...]')


def _si(value: float | None, unit: str = '') -> str:
  """1.23e12 -> '1.23 T' + unit; None -> 'n/a'."""
  if value is None or not math.isfinite(value):
    return 'n/a'
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(value) >= scale:
      return f'{value / scale:.3g} {prefix}{unit}'
  return f'{value:.3g} {unit}'


def table(results: dict[str, Any]) -> list[str]:
  """The human-readable lines of `results`."""
  r = results
  ratio = (r['flops_per_step'] / r['model_flops_per_step']
           if r['flops_per_step'] and r['model_flops_per_step'] else None)
  rows = [
      ('config', f"{r['config']} ({r['method']}, batch {r['batch_size']}, {r['devices']} x "
                 f"{r['device_kind'] or r['platform']})"),
      ('compile', f"{r['compile_s']:.2f} s"),
      ('step time', f"median {1e3 * r['step_time_s']:.1f} ms (p10 {1e3 * r['step_time_p10_s']:.1f}"
                    f", p90 {1e3 * r['step_time_p90_s']:.1f}, min {1e3 * r['step_time_min_s']:.1f}"
                    f", max {1e3 * r['step_time_max_s']:.1f}) over {r['steps']} steps"),
      ('throughput', f"{r['examples_per_s']:.1f} examples/s"
                     + (f", {r['tokens_per_s']:.0f} tokens/s" if 'tokens_per_s' in r else '')),
      ('FLOPs / step', f"XLA {_si(r['flops_per_step'])}, analytic {_si(r['model_flops_per_step'])}"
                       + (f' (XLA / analytic {ratio:.2f})' if ratio else '')
                       + ('; on a GPU XLA counts no cuBLAS/cuDNN call (matmuls, attention)'
                          if r['platform'] == 'gpu' else '')
                       + (f"; XLA saw one of {r['grad_accum_steps']} micro-batches"
                          if r['grad_accum_steps'] > 1 else '')),
      ('achieved', f"{_si(r['flops_per_s_per_device'], 'FLOP/s')} per device "
                   f"({r['mfu_flops']} FLOPs)"),
      ('peak', f"{_si(r['peak_flops_per_device'], 'FLOP/s')} ({r['peak_source']})"),
      ('MFU', 'n/a' if r['mfu'] is None else f"{100 * r['mfu']:.1f}%"),
      ('input wait', f"{100 * r['input_wait_fraction']:.1f}% of step time"),
      ('peak memory', f"{_si(r['peak_memory_bytes'], 'B')} ({r['peak_memory_source']})"),
  ]
  lines = [f'{name:>13} | {value}' for name, value in rows]
  if r.get('top_ops'):
    lines.append(f"HLO ops that took longest, over {TRACE_STEPS} traced steps "
                 '(thread time; ops on parallel threads add up):')
    lines += [f"{1e3 * op['s_per_step']:9.2f} ms {100 * op['share']:5.1f}%  {op['op']:32s} "
              f"{op['shape_and_source']}" for op in r['top_ops']]
    lines.append('The same time by kind of op (the name without its number), '
                 f"{min(KINDS_SHOWN, len(r['top_op_kinds']))} largest:")
    lines += [f"{1e3 * k['s_per_step']:9.2f} ms {100 * k['share']:5.1f}%  {k['kind']:32s} "
              f"{k['ops']} ops" for k in r['top_op_kinds'][:KINDS_SHOWN]]
    timeline = r['top_ops_timeline']
    lines.append(f"Named HLO ops ran during {100 * timeline['busy_fraction']:.0f}% of the traced "
                 f"timeline ({1e3 * timeline['busy_s_per_step']:.1f} of "
                 f"{1e3 * timeline['span_s_per_step']:.1f} ms a step); the rest is work without an "
                 "op name (on XLA:CPU, Eigen's convolutions) and time between ops.")
  return lines


def top_ops(trace_dir: str, hlo_text: str, count: int) -> dict[str, Any]:
  """The `count` HLO ops with the most traced time and how much of the timeline ops covered.

  -> {'top_ops': [per op: time per step, share of all ops' time, shape and
  source], 'top_op_kinds': [per kind of op (`profiling.op_kind`), all of
  them: time per step, share, number of ops], 'top_ops_timeline': the named
  ops' busy time and span per step (`profiling.busy_and_span`) and busy / span}.
  """
  from ssl_jax import profiling  # Imports jax: after flag parsing, as in `bench`.
  events = profiling.hlo_events(trace_dir)
  seconds = profiling.hlo_op_times(events)
  total = sum(seconds.values()) or 1.0
  ranked = seconds.most_common(count)
  described = profiling.describe_ops(hlo_text, [op for op, _ in ranked])
  busy, span = profiling.busy_and_span(events)
  return {
      'top_ops': [{'op': op, 's_per_step': t / TRACE_STEPS, 'share': t / total,
                   'shape_and_source': described.get(op, '')} for op, t in ranked],
      'top_op_kinds': [{'kind': kind, 's_per_step': t / TRACE_STEPS, 'share': t / total,
                        'ops': n} for kind, t, n in profiling.times_by_kind(seconds)],
      'top_ops_timeline': {'busy_s_per_step': busy / TRACE_STEPS,
                           'span_s_per_step': span / TRACE_STEPS,
                           'busy_fraction': busy / span if span else 0.0}}


def bench(config, name: str, warmup_steps: int, steps: int,
          ops: int = 0) -> dict[str, Any]:
  """Times `config`'s train step in a temporary workdir; returns the results dict.

  `ops` > 0 adds 'top_ops', the longest HLO ops of TRACE_STEPS traced steps,
  and 'top_ops_timeline', the share of those steps' timeline that any
  named op covered.
  """
  from ssl_jax import step_bench  # After flag parsing: a bad flag costs no jax start-up.
  if steps < 1 or warmup_steps < 0 or ops < 0:
    raise UserError(f'--steps={steps} must be >= 1, --warmup_steps={warmup_steps} and '
                    f'--top_ops={ops} >= 0')
  with tempfile.TemporaryDirectory(prefix='ssl_jax_bench_') as workdir:
    times = step_bench.time_train_step(config, workdir, warmup_steps=warmup_steps, steps=steps,
                                       trace_steps=TRACE_STEPS if ops else 0)
    ranked = top_ops(f'{workdir}/trace', times.hlo_text, ops) if ops else {}
  peak, source = step_bench.peak_flops_per_device()
  return step_bench.summary(name, times, peak, source) | ranked


def main(argv: list[str]) -> None:
  """Runs the benchmark; prints the table, then the JSON line last."""
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  cli.quiet_logging()
  host_memory.keep_freed_memory()  # Before jax starts its backend.
  name = next(a.split('=', 1)[1] for a in sys.argv if a.startswith('--config='))
  if _TOP_OPS.value:  # Before jax starts its backend, which reads XLA_FLAGS once.
    from ssl_jax import profiling
    os.environ['XLA_FLAGS'] = profiling.flags_for_trace(os.environ.get('XLA_FLAGS', ''))
  try:
    results = bench(_CONFIG.value, name, _WARMUP_STEPS.value, _STEPS.value, _TOP_OPS.value)
  except UserError as e:
    sys.exit(f'error: {e}')
  for line in table(results):
    print(line, flush=True)
  print(json.dumps(results), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: cli.parse_config_flags(argv, USAGE))
