"""Dropout, stochastic depth and the keys they draw from: the transformers' regularizers.

Each is the identity without a key (or at rate 0), so evaluation and
deterministic steps pass None.
"""

import jax
import jax.numpy as jnp
import numpy as np


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `rng` is None or `rate` is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_rng(rng: jax.Array | None, num: int) -> list[jax.Array | None]:
  """`num` independent keys from `rng`, or `num` Nones when there is no rng."""
  return [None] * num if rng is None else list(jax.random.split(rng, num))


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth on a residual branch (B, ...): timm / DINO's `drop_path`.

  facebookresearch/dino vision_transformer.py lines 27-35: each example's
  branch is zeroed with probability `rate` and kept ones are scaled by
  1 / (1 - rate), so the expectation is unchanged. No key (or rate 0): the
  identity, as `drop_path(..., training=False)`. The mask has one entry per
  row of `x` drawn from `key` for the whole (global) batch, so it does not
  depend on how the batch is sharded.
  """
  if key is None or rate == 0.0:
    return x
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (keep / keep_prob).astype(x.dtype)


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
  """Block i's rate: linear from 0 at the first block to `drop_path_rate` at the last.

  DINO's stochastic depth decay rule, vision_transformer.py line 150:
  `torch.linspace(0, drop_path_rate, depth)`.
  """
  return [float(rate) for rate in np.linspace(0.0, drop_path_rate, depth)]
