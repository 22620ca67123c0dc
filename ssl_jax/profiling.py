"""A `jax.profiler` trace of a few train steps, for TensorBoard's profile tab or Perfetto.

`--config.train.profile_steps=N` traces the N steps that follow the first
step of the run (that one compiles, and its trace would be mostly the
compiler). The trace lands in WORKDIR/profile/plugins/profile/<time>/ as
`<host>.xplane.pb` (TensorBoard: `tensorboard --logdir WORKDIR/profile`,
with the tensorboard-plugin-profile package) and `perfetto_trace.json.gz`
(drop it on ui.perfetto.dev). The last traced step is waited for before the
trace stops, so its device work is inside the trace
(jax.readthedocs.io/en/latest/profiling.html).
"""

from typing import Any

import jax
from etils import epath

from ssl_jax.metrics import log_line


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
