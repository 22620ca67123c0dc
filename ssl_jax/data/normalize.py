"""On-device conversion between uint8 pixels and normalised float images."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# torchvision's ImageNet statistics, used by the MAE, SimCLR and DINO code.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit(images: jax.Array) -> jax.Array:
  """uint8 pixels -> float32 in [0, 1] (x / 255, as torchvision's ToTensor)."""
  return images.astype(jnp.float32) / 255.0


def standardize(images01: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """float [0, 1] (..., C) images -> (x - mean) / std per channel."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images01 - mean) / std


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 (..., C) pixels -> float32 (x / 255 - mean) / std per channel."""
  return standardize(to_unit(images), mean, std)


def denormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Inverse of `normalize`, on the host: float images -> uint8, clipped."""
  pixels = (np.asarray(images, np.float32) * np.asarray(std) + np.asarray(mean)) * 255.0
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)
