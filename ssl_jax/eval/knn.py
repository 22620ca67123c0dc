"""Weighted k-nearest-neighbour probe (Wu et al. 2018, as used in DINO).

Features are L2-normalised; each test example takes the k most cosine-similar
training examples and votes for their labels with weight exp(sim / T)
(DINO's `eval_knn.py`: k=20, T=0.07). No parameter is trained, so the
number measures the representation itself.
"""

import numpy as np

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


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray, *, k: int,
                 temperature: float) -> float:
  """Top-1 accuracy of the weighted kNN classifier: train examples vote for test ones."""
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  predictions = knn_predict(train_features, train_labels, test_features, k=k,
                            temperature=temperature, num_classes=num_classes)
  return float(np.mean(predictions == test_labels))
