"""kNN and offline linear probes against brute-force references."""

import numpy as np

from ssl_jax.eval import knn
from ssl_jax.eval.linear_probe import linear_probe_accuracy


def brute_force_knn(train, train_labels, test, k, temperature, num_classes):
  """DINO's eval_knn.py weighted vote, one test example at a time."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  predictions = []
  for x in test:
    sim = train @ (x / np.linalg.norm(x))
    top = np.argsort(-sim)[:k]
    votes = np.zeros(num_classes)
    for i in top:
      votes[train_labels[i]] += np.exp(sim[i] / temperature)
    predictions.append(votes.argmax())
  return np.array(predictions)


def test_knn_predict_matches_brute_force():
  rng = np.random.default_rng(0)
  train, test = rng.normal(size=(200, 16)), rng.normal(size=(50, 16))
  labels = rng.integers(0, 5, 200)
  for k in (1, 7, 20):
    np.testing.assert_array_equal(
        knn.knn_predict(train, labels, test, k=k, temperature=0.07, num_classes=5),
        brute_force_knn(train, labels, test, k, 0.07, 5))


def test_knn_accuracy_on_clusters_and_noise():
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(4, 32)) * 5
  labels = rng.integers(0, 4, 300)
  features = centers[labels] + rng.normal(size=(300, 32))
  assert knn.knn_accuracy(features[:200], labels[:200], features[200:], labels[200:],
                          k=20, temperature=0.07) == 1.0
  noise = rng.normal(size=(300, 32))
  chance = knn.knn_accuracy(noise[:200], labels[:200], noise[200:], labels[200:], k=20,
                            temperature=0.07)
  assert chance < 0.45


def test_linear_probe_separates_linear_classes_and_not_noise():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(600, 20))
  labels = np.argmax(features[:, :3] @ rng.normal(size=(3, 3)), axis=1)  # Linear classes.
  accuracy = linear_probe_accuracy(features[:400], labels[:400], features[400:], labels[400:])
  assert accuracy > 0.9
  shuffled = rng.permutation(labels)
  chance = linear_probe_accuracy(features[:400], shuffled[:400], features[400:], shuffled[400:])
  assert chance < 0.5
