"""The one uint8 -> [0, 1] conversion and the one mean/std normalisation."""

import jax.numpy as jnp
import numpy as np

from ssl_jax.data.normalize import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  denormalize,
  normalize,
  standardize,
  to_unit,
)


def test_to_unit_standardize_and_normalize_numbers():
  pixels = jnp.asarray(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1))
  unit = to_unit(pixels)
  assert unit.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(unit)[0, 0, :3, 0], np.float32([0, 1, 2]) / 255)
  assert float(unit.min()) == 0.0 and float(unit.max()) == 1.0
  expected = (np.asarray(pixels, np.float32) / np.float32(255) - np.float32(IMAGENET_MEAN)) \
      / np.float32(IMAGENET_STD)
  normalized = np.asarray(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD))
  np.testing.assert_allclose(normalized, expected, rtol=0, atol=1e-6)
  # Bit-identical to the inline formulas the methods used before sharing these.
  mean, std = jnp.asarray(IMAGENET_MEAN, jnp.float32), jnp.asarray(IMAGENET_STD, jnp.float32)
  np.testing.assert_array_equal(normalized,
                                np.asarray((pixels.astype(jnp.float32) / 255.0 - mean) / std))
  np.testing.assert_array_equal(np.asarray(standardize(unit, IMAGENET_MEAN, IMAGENET_STD)),
                                normalized)
  np.testing.assert_array_equal(
      denormalize(normalized, IMAGENET_MEAN, IMAGENET_STD), np.asarray(pixels))
