"""The offline linear probe against scikit-learn's LogisticRegression at the same optimum.

Ours (ssl_jax/eval/linear_probe.py) standardises with the train split's
statistics and minimises mean softmax cross-entropy + (weight_decay / 2)
||W||^2 (bias unpenalised) with full-batch Adam from zero. sklearn's
multinomial LogisticRegression minimises C * sum cross-entropy + ||W||^2 / 2
(intercept unpenalised): the same objective, scaled, for C = 1 / (weight_decay * n).
Fitted to convergence on the same standardised features it is the optimum
our Adam run approaches.

Data: noisy Gaussian blobs that overlap (sklearn's test accuracy ~0.8, so
the optimum is finite and well defined), unequal class sizes (a missing or
frozen bias shows), features on scales from 0.1 to 10 with offsets (a wrong
standardisation shows). Only `linear_probe_accuracy` is public, so the
agreement of the two classifiers is measured through it: scored against
sklearn's predictions as labels, its accuracy is the share of agreeing
predictions. Measured: agreement 0.991 (train), 0.992 (test), 0.985 (test
classes 0-1); test accuracy 0.780 against sklearn's 0.778. Caught at these
thresholds: 30 Adam steps instead of 300 (agreement 0.84), no bias (0.86),
no centring (0.92), test features standardised with their own mean (0.77).

The objective reached is not asserted: the fitted weights are not public.
(A copy of the fit loop on blobs like these reached within 0.1-0.8% of
sklearn's optimum; on nearly separable features, e.g. raw digits, 300 Adam
steps stop at 2-4x the optimum objective, an early stop that leaves test
accuracy unchanged.)
"""

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.linear_model import LogisticRegression

from ssl_jax.eval.linear_probe import linear_probe_accuracy

WEIGHT_DECAY = 1e-4  # linear_probe_accuracy's default


@pytest.fixture(scope='module')
def blobs():
  """(train_x, train_y, test_x, test_y): 1000 / 500 points, 5 overlapping classes, 16 features."""
  rng = np.random.default_rng(0)
  features, labels = make_blobs(n_samples=[500, 300, 300, 200, 200], n_features=16,
                                cluster_std=12.0, random_state=1)
  features = (features + rng.normal(0, 100, 16)) * rng.uniform(0.1, 10, 16)
  order = rng.permutation(len(labels))
  features, labels = features[order].astype(np.float32), labels[order]
  return features[:1000], labels[:1000], features[1000:], labels[1000:]


@pytest.fixture(scope='module')
def sklearn_probe(blobs):
  """sklearn's optimum of our objective on our standardisation of the features."""
  train_x, train_y, _, _ = blobs
  mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
  classifier = LogisticRegression(C=1 / (WEIGHT_DECAY * len(train_y)), tol=1e-10, max_iter=10_000)
  classifier.fit((train_x - mean) / std, train_y)
  return lambda x: classifier.predict((x - mean) / std)


def test_linear_probe_matches_sklearn_accuracy(blobs, sklearn_probe):
  train_x, train_y, test_x, test_y = blobs
  sklearn_accuracy = np.mean(sklearn_probe(test_x) == test_y)
  assert 0.6 < sklearn_accuracy < 0.95, sklearn_accuracy  # Overlapping, far above chance (0.2).
  ours = linear_probe_accuracy(train_x, train_y, test_x, test_y)
  assert abs(ours - sklearn_accuracy) <= 0.01, (ours, sklearn_accuracy)


@pytest.mark.parametrize('split', ['train', 'test', 'test_classes_0_1'])
def test_linear_probe_agrees_with_sklearn_predictions(blobs, sklearn_probe, split):
  """Scored against sklearn's predictions, our accuracy is the share of agreeing predictions.

  `test_classes_0_1`, a test split whose mean is far from the train split's,
  shows whether the test features are standardised with the train statistics.
  """
  train_x, train_y, test_x, test_y = blobs
  x = {'train': train_x, 'test': test_x, 'test_classes_0_1': test_x[test_y < 2]}[split]
  agreement = linear_probe_accuracy(train_x, train_y, x, sklearn_probe(x))
  assert agreement >= 0.97, agreement
