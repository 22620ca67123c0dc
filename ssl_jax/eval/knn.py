"""Weighted k-nearest-neighbour probe (Wu et al. 2018, as used in DINO).

Features are L2-normalised; each test example takes the k most cosine-similar
training examples and votes for their labels with weight exp(sim / T)
(DINO's `eval_knn.py`: k=20, T=0.07). No parameter is trained, so the
number measures the representation itself.
"""

import functools
from collections.abc import Iterable

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ssl_jax import sharding
from ssl_jax.methods.base import Method

# Host memory for one block of test x train similarities.
_SIMILARITY_BYTES = 256 * 2**20


def knn_predict(train_features: np.ndarray, train_labels: np.ndarray,
                test_features: np.ndarray, *, k: int, temperature: float,
                num_classes: int) -> np.ndarray:
  """Temperature-weighted kNN votes; returns (N_test,) predicted labels."""
  train = train_features / np.linalg.norm(train_features, axis=1, keepdims=True).clip(1e-12)
  k = min(k, len(train))
  chunk = max(1, _SIMILARITY_BYTES // (4 * len(train)))  # Test rows per similarity block.
  predictions = []
  for start in range(0, len(test_features), chunk):
    test = test_features[start:start + chunk]
    test = test / np.linalg.norm(test, axis=1, keepdims=True).clip(1e-12)
    similarity = test @ train.T  # (b, N_train)
    nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # (b, k), unordered
    weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
    votes = np.zeros((len(test), num_classes))
    np.add.at(votes, (np.arange(len(test))[:, None], train_labels[nearest]), weights)
    predictions.append(votes.argmax(axis=1))
  return np.concatenate(predictions)


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


def knn_accuracy(method: Method, encoder: nnx.Module, train_batches: Iterable[dict],
                 test_batches: Iterable[dict], mesh: jax.sharding.Mesh, *, k: int,
                 temperature: float) -> float:
  """Top-1 accuracy of the weighted kNN classifier: train batches vote for test ones."""
  train_features, train_labels = extract_features(method, encoder, train_batches, mesh)
  test_features, test_labels = extract_features(method, encoder, test_batches, mesh)
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  predictions = knn_predict(train_features, train_labels, test_features, k=k,
                            temperature=temperature, num_classes=num_classes)
  return float(np.mean(predictions == test_labels))
