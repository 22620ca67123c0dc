"""A `jax.profiler` trace of a few train steps, for TensorBoard's profile tab or Perfetto.

`--config.train.profile_steps=N` traces the N steps that follow the first
step of the run (that one compiles, and its trace would be mostly the
compiler). The trace lands in WORKDIR/profile/plugins/profile/<time>/ as
`<host>.xplane.pb` (TensorBoard: `tensorboard --logdir WORKDIR/profile`,
with the tensorboard-plugin-profile package) and `perfetto_trace.json.gz`
(drop it on ui.perfetto.dev). The last traced step is waited for before the
trace stops, so its device work is inside the trace
(jax.readthedocs.io/en/latest/profiling.html).

`hlo_op_times` reads such a trace back as time per compiled HLO op (XLA:CPU
records one event per thunk, with its `hlo_op`), `busy_and_span` how much of
the traced timeline those ops cover, and `describe_ops` finds each op's
shape and source in the compiled HLO text: what
`python -m ssl_jax.bench --top_ops=N` prints, with XLA:GPU's CUDA graphs off
(`flags_for_trace`).
"""

import collections
import gzip
import json
import re
from typing import Any

import jax
from etils import epath

from ssl_jax.metrics import log_line

NO_CUDA_GRAPHS = '--xla_gpu_enable_command_buffer='


class StepProfiler:
  """Starts a trace before step `first_step + 1` and stops it after `count` steps."""

  def __init__(self, directory: epath.PathLike, first_step: int, count: int | None):
    self.directory = epath.Path(directory)
    self.count = int(count or 0)
    if self.count < 0:
      raise ValueError(f'config.train.profile_steps={count}: expected a count of steps >= 0.')
    self.start = first_step + 1  # After the compiling step.
    self.stop = self.start + self.count - 1
    self.active = False

  def before(self, step: int) -> None:
    """Called before step `step` runs: starts the trace at its first step."""
    if self.count and step == self.start:
      self.directory.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, state: Any) -> None:
    """Called after step `step` was dispatched: at the last traced step, waits and stops."""
    if self.active and step >= self.stop:
      jax.block_until_ready(state)
      self.close()
      log_line(f'Profiler trace of steps {self.start}-{step} written under {self.directory}')

  def close(self) -> None:
    """Stops a running trace (a run that ended or failed inside the traced steps)."""
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


def hlo_events(directory: epath.PathLike) -> list[dict[str, Any]]:
  """The complete events that carry an `hlo_op` (XLA's thunks) in the newest Perfetto trace."""
  traces = sorted(epath.Path(directory).glob('plugins/profile/*/perfetto_trace.json.gz'),
                  key=lambda p: p.stat().mtime)
  if not traces:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {directory}')
  with gzip.open(traces[-1].as_posix(), 'rt') as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  return [e for e in events if e.get('ph') == 'X' and (e.get('args') or {}).get('hlo_op')]


def hlo_op_times(events: list[dict[str, Any]]) -> collections.Counter:
  """{HLO op name: seconds} summed over `events` (`hlo_events`).

  The times of ops that ran in parallel on different threads add up, so the
  sum can exceed the wall time.
  """
  seconds = collections.Counter()
  for event in events:
    seconds[event['args']['hlo_op']] += event.get('dur', 0.0) * 1e-6
  return seconds


def op_kind(op: str) -> str:
  """An HLO op's kind: its name without XLA's numbering ('ynn_fusion.12' -> 'ynn_fusion')."""
  return re.sub(r'\.\d+$', '', op)


def times_by_kind(seconds: collections.Counter) -> list[tuple[str, float, int]]:
  """(kind, summed seconds, number of ops) for each `op_kind` in `hlo_op_times`, longest first.

  On XLA:CPU the kinds say what the time is spent on: `ynn_fusion` (YNNPACK
  matmuls and reductions), `dot` and `convolution` (Eigen; their async work
  is only partly inside the event), `transpose_copy_fusion` (layout
  copies), `wrapped_broadcast` (broadcasts materialised for a library
  call), other `*_fusion`s (XLA's own loops).
  """
  totals, counts = collections.Counter(), collections.Counter()
  for op, t in seconds.items():
    totals[op_kind(op)] += t
    counts[op_kind(op)] += 1
  return [(kind, t, counts[kind]) for kind, t in totals.most_common()]


def busy_and_span(events: list[dict[str, Any]]) -> tuple[float, float]:
  """(busy, span) seconds of `events` on the timeline, whatever their threads.

  busy is the union of their [ts, ts + dur) intervals: the time during which
  at least one named op ran; span runs from the first start to the last end.
  What is not busy ran without an HLO op name (XLA:CPU's Eigen convolutions
  finish on Eigen's pool after their thunk's event ends) or is host time
  between ops, which a list of the longest ops cannot show.
  """
  intervals = sorted((e['ts'], e['ts'] + e.get('dur', 0.0)) for e in events)
  if not intervals:
    return 0.0, 0.0
  busy, (start, end) = 0.0, intervals[0]
  for begin, finish in intervals[1:]:
    if begin > end:
      busy, start = busy + end - start, begin
    end = max(end, finish)
  busy += end - start
  return busy * 1e-6, (end - intervals[0][0]) * 1e-6


def describe_ops(hlo_text: str, names: list[str]) -> dict[str, str]:
  """{op: 'shape  source'} for each of `names` defined in a compiled module's HLO text.

  The source is the `op_name` metadata jax writes (e.g.
  jit(train_step)/transpose(jvp())/add_any: an add of the backward pass).
  """
  wanted, described = set(names), {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%(\S+) = (\S+) ', line)
    if match and match.group(1) in wanted and match.group(1) not in described:
      source = re.search(r'op_name="([^"]*)"', line)
      described[match.group(1)] = f'{match.group(2)}  {source.group(1) if source else ""}'.rstrip()
  return described


def flags_for_trace(xla_flags: str) -> str:
  """XLA_FLAGS for a `--top_ops` run: XLA:GPU's CUDA graphs off, unless the user set them.

  XLA:GPU runs most of a step as CUDA graphs ("command buffers"), which a
  trace shows as one op: `command_buffer_156` held 93.5% of MAE ViT-B's
  kernel time on an H200. Without them each kernel is its own op; GPT-2
  124M's step was then 2-4% faster, not slower (docs/benchmarks.md, "One
  GPU"). XLA:CPU has no command buffers and ignores the flag.
  """
  if 'xla_gpu_enable_command_buffer' in xla_flags:
    return xla_flags
  return f'{xla_flags} {NO_CUDA_GRAPHS}'.strip()
