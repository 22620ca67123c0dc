"""Timing callables in alternating rounds, and printing their medians (issue 15).

This machine drifts up to 2x between runs, so the micro-benchmarks compare
alternatives inside one process, each round running every one in turn (the
order reversed every other round). Pure Python: the jax benchmarks import it
as `benchmarks.alternating`, the PyTorch ones (run as scripts in their own
venv) from their own folder.
"""

import statistics
import time
from collections.abc import Callable


def time_rounds(calls: dict[str, Callable[[], object]], rounds: int,
                steps: int) -> dict[str, list[float]]:
  """{name: seconds a call, per round}: each call once untimed, then `steps` timed calls.

  Each callable must return only once its work is done (jax: block_until_ready).
  """
  times = {name: [] for name in calls}
  for r in range(rounds):
    for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
      calls[name]()
      start = time.perf_counter()
      for _ in range(steps):
        calls[name]()
      times[name].append((time.perf_counter() - start) / steps)
  return times


def report(times: dict[str, list[float]]) -> dict[str, float]:
  """Prints each name's median and its rounds in ms; returns {name: median seconds}."""
  medians = {name: statistics.median(t) for name, t in times.items()}
  for name, seconds in medians.items():
    print(f'{name:8s} {1e3 * seconds:8.2f} ms  (rounds: '
          f'{", ".join(f"{1e3 * t:.1f}" for t in times[name])})')
  return medians
