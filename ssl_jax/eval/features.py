"""Frozen-encoder features of an eval split, gathered from every host."""

import functools
from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ssl_jax import sharding
from ssl_jax.methods.base import Method


@functools.partial(jax.jit, static_argnums=(0, 1))
def _features(method: Method, graphdef: nnx.GraphDef, state: nnx.State,
              images: jax.Array) -> jax.Array:
  return method.features(nnx.merge(graphdef, state), images)


def extract_features(method: Method, encoder: nnx.Module, batches: Iterable[dict],
                     mesh: jax.sharding.Mesh) -> tuple[np.ndarray, np.ndarray]:
  """Runs `method.features` over sharded eval batches; returns every host the whole set."""
  graphdef, state = nnx.split(encoder)
  features, labels = [], []
  for batch in batches:
    valid = batch['valid']
    device_batch = sharding.put_batch({'image': batch['image'], 'label': batch['label'],
                                       'valid': valid}, mesh)
    out = _features(method, graphdef, state, device_batch['image'])
    out, label, valid = multihost_utils.process_allgather(
        (out, device_batch['label'], device_batch['valid']), tiled=True)
    features.append(np.asarray(out)[valid])
    labels.append(np.asarray(label)[valid])
  return np.concatenate(features), np.concatenate(labels)
