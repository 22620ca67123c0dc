"""data/device_prefetch: batches put ahead by a thread, the state of the last batch taken."""

import json
import time

import jax
import numpy as np
import pytest

from ssl_jax import sharding
from ssl_jax.data.device_prefetch import DevicePrefetch


class Counting:
  """A host iterator of batches [i, i + 1, ...] with a dict state, as grain's DatasetIterator."""

  def __init__(self, fail_at: int | None = None):
    self.index, self.fail_at, self.closed = 0, fail_at, False

  def __next__(self):
    if self.index == self.fail_at:
      raise ValueError(f'corrupt record {self.index}')
    batch = {'x': np.arange(8, dtype=np.int32) + 8 * self.index}
    self.index += 1
    return batch

  def get_state(self):
    return {'index': self.index}

  def set_state(self, state):
    self.index = state['index']

  def close(self):
    self.closed = True


def mesh():
  return sharding.make_mesh(sharding.mesh_config(-1, 1, 1), jax.devices())


def test_batches_are_the_host_batches_on_the_mesh():
  prefetch = DevicePrefetch(Counting(), mesh(), size=2)
  for index in range(5):
    batch = next(prefetch)
    assert isinstance(batch['x'], jax.Array) and len(batch['x'].sharding.device_set) == 8
    np.testing.assert_array_equal(batch['x'], np.arange(8) + 8 * index)
  prefetch.close()


def test_state_is_the_last_batch_taken_not_the_last_read():
  host = Counting()
  prefetch = DevicePrefetch(host, mesh(), size=3)
  assert json.loads(prefetch.get_state()) == {'index': 0}
  next(prefetch)
  next(prefetch)
  deadline = time.monotonic() + 10
  while host.index < 5 and time.monotonic() < deadline:  # The thread reads 3 (+1) ahead.
    time.sleep(0.01)
  assert host.index >= 5
  state = prefetch.get_state()
  # What grain's checkpoint handler would have written for the host iterator itself.
  assert state == json.dumps({'index': 2}, indent=4).encode()
  resumed = DevicePrefetch(Counting(), mesh())
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['x'], next(prefetch)['x'])
  prefetch.set_state(state)  # Rewinding a running prefetch drops what it read ahead.
  np.testing.assert_array_equal(next(prefetch)['x'], np.arange(8) + 16)
  prefetch.close()
  resumed.close()
  assert host.closed


def test_host_errors_reach_the_loop():
  prefetch = DevicePrefetch(Counting(fail_at=1), mesh())
  next(prefetch)
  with pytest.raises(ValueError, match='corrupt record 1'):
    next(prefetch)
  prefetch.close()


def test_bytes_states_pass_through():
  class BytesState(Counting):
    def get_state(self):
      return str(self.index).encode()

    def set_state(self, state):
      self.index = int(state)

  prefetch = DevicePrefetch(BytesState(), mesh())
  next(prefetch)
  assert prefetch.get_state() == b'1'
  prefetch.set_state(b'4')
  np.testing.assert_array_equal(next(prefetch)['x'], np.arange(8) + 32)
  prefetch.close()
