"""Test session set-up: 8 fake CPU devices, before anything imports jax."""

import os

# Sharded-vs-single-device tests need several devices; on CPU XLA fakes them.
# This must run before jax is imported anywhere in the test session.
# XLA's backend optimisations triple compile time on CPU and buy nothing for
# the few steps a test runs (end-to-end tests start their own processes
# without this flag).
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_backend_optimization_level=0').strip()

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

from tests.text_fixtures import run_dir  # noqa: E402, F401  (a fixture of the text-data tests)

# grain's multiprocess prefetch reads absl flags; tests run without app.run.
flags.FLAGS.mark_as_parsed()

assert jax.device_count() == 8, 'XLA_FLAGS was set too late: jax was already imported'


@pytest.fixture
def indexed_npz(tmp_path):
  """100 random 10x10 RGB images whose label is their index: labels name examples."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (100, 10, 10, 3), dtype=np.uint8)
  path = tmp_path / 'indexed.npz'
  np.savez(path, images=images, labels=np.arange(100))
  return f'npz:{path}', images
