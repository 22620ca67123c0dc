"""Offline linear probe: logistic regression on frozen, standardised features.

The probe behind the "linear probe" numbers of MAE and SimCLR, at the scale
of an in-memory eval set: features are standardised with the train split's
statistics (MAE puts a BatchNorm without affine before its linear head for
the same reason), then a softmax classifier is fitted full-batch with Adam
and a little L2. Deterministic: zero init, no sampling.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def linear_probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                          test_features: np.ndarray, test_labels: np.ndarray, *,
                          steps: int = 300, lr: float = 0.01,
                          weight_decay: float = 1e-4) -> float:
  """Test top-1 of a softmax classifier fitted to the train features."""
  mean = train_features.mean(axis=0)
  std = train_features.std(axis=0) + 1e-6
  train_x = jnp.asarray((train_features - mean) / std, jnp.float32)
  test_x = jnp.asarray((test_features - mean) / std, jnp.float32)
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  targets = jax.nn.one_hot(train_labels, num_classes)
  params = {'w': jnp.zeros((train_x.shape[1], num_classes)), 'b': jnp.zeros(num_classes)}
  tx = optax.adam(lr)

  def loss(params):
    logits = train_x @ params['w'] + params['b']
    ce = optax.softmax_cross_entropy(logits, targets).mean()
    return ce + 0.5 * weight_decay * jnp.sum(params['w'] ** 2)

  @jax.jit
  def fit(params):
    def step(carry, _):
      params, opt_state = carry
      updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), length=steps)
    return params

  params = fit(params)
  predictions = np.asarray((test_x @ params['w'] + params['b']).argmax(-1))
  return float(np.mean(predictions == test_labels))
