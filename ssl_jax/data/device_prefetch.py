"""The next batches put on the devices by a background thread, while the step runs.

The training loop used to put each batch on the mesh itself, between
dispatching one step and the next (`sharding.put_batch`). On a busy host that
is not free: on the 2-core CPU machine, MAE's `:local` run spent 4.6 ms a step
there (0.27 ms when idle), 5-7% of its step, competing with XLA's threads
(docs/benchmarks.md). As flax's `jax_utils.prefetch_to_device` and
big_vision's `prefetch_iterator` do, a thread here reads the host iterator
and puts `size` batches ahead; the loop only takes them from a queue.

Checkpoints must resume after the last batch the loop *took*, not the last
one the thread read. The thread therefore snapshots the host iterator's state
after reading each batch and queues it with the batch; `get_state` returns the
snapshot of the batch taken last, and `set_state` (before the first batch,
as a restore does, or later) stops the thread, drops what it read ahead and
rewinds the host iterator.

grain's checkpoint handler (grain.checkpoint.CheckpointSave / Restore) writes
a grain DatasetIterator's dict state as indented JSON, and any other
iterator's as the bytes its `get_state` returns. This iterator is not a
DatasetIterator, so it hands the handler that same JSON as bytes: the files
are the ones the host iterator itself would have written, and checkpoints
move between the two.
"""

import json
import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax

from ssl_jax import sharding


class DevicePrefetch(Iterator[dict[str, jax.Array]]):
  """Iterates global device batches of `iterator`'s host batches, `size` put ahead."""

  def __init__(self, iterator: Any, mesh: jax.sharding.Mesh, size: int = 2):
    if size < 1:
      raise ValueError(f'DevicePrefetch needs size >= 1, got {size}')
    self._iterator = iterator
    self._mesh = mesh
    self._size = size
    self._state = iterator.get_state()
    self._json = not isinstance(self._state, bytes)  # A grain DatasetIterator's dict.
    self._queue: queue.Queue | None = None
    self._stop: threading.Event | None = None  # Each started thread gets its own.
    self._thread: threading.Thread | None = None

  def _produce(self, out: queue.Queue, stop: threading.Event) -> None:
    try:
      while not stop.is_set():
        batch = sharding.put_batch(next(self._iterator), self._mesh)
        item = (batch, self._iterator.get_state(), None)
        while not stop.is_set():
          try:
            out.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as error:  # noqa: BLE001  (re-raised in the loop's thread)
      out.put((None, None, error))

  def _start(self) -> None:
    self._stop = threading.Event()
    self._queue = queue.Queue(maxsize=self._size)
    self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                    name='DevicePrefetch', daemon=True)
    self._thread.start()

  def _halt(self) -> None:
    """Stops the thread and drops the batches it read ahead."""
    if self._thread is None:
      return
    self._stop.set()
    while self._thread.is_alive():
      try:  # Unblock a put on a full queue.
        self._queue.get(timeout=0.1)
      except queue.Empty:
        pass
    self._thread, self._queue = None, None

  def __next__(self) -> dict[str, jax.Array]:
    if self._thread is None:
      self._start()
    batch, state, error = self._queue.get()
    if error is not None:
      self._thread, self._queue = None, None  # The thread has ended.
      raise error
    self._state = state
    return batch

  def get_state(self) -> bytes:
    """The host iterator's state after the last batch this iterator returned, as bytes."""
    return json.dumps(self._state, indent=4).encode() if self._json else self._state

  def set_state(self, state: bytes) -> None:
    """Rewinds to `state` (from `get_state`): the next batch is the one after it."""
    self._halt()
    self._state = json.loads(state) if self._json else state
    self._iterator.set_state(self._state)

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore (this thread starts on demand)."""
    if hasattr(self._iterator, 'start_prefetch'):
      self._iterator.start_prefetch()

  def close(self) -> None:
    """Stops the thread, then the host iterator's own threads or processes."""
    self._halt()
    if hasattr(self._iterator, 'close'):
      self._iterator.close()
