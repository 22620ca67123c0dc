"""Shared helpers of the data tests: a small config and batch comparisons."""

import ml_collections
import numpy as np


def data_config(**overrides) -> ml_collections.ConfigDict:
  """A CPU-sized `config.data` with the keys the real configs define."""
  data = dict(source='digits:train', tfds_dir=None, batch_size=32, image_size=12, channels=1,
              crop_scale=(0.35, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True,
              eval_crop_fraction=1.0, interpolation='bilinear',
              num_workers=0, prefetch=2)
  data.update(overrides)
  return ml_collections.ConfigDict(data)


def take(iterator, n):
  """The next `n` batches."""
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  """Two lists of batches are bitwise equal."""
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
