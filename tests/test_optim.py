"""Optimizers and schedules against hand-written formulas."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ssl_jax import optim


def config(**overrides) -> ml_collections.ConfigDict:
  return optim.optim_config(**overrides)


def params():
  return {'conv': {'kernel': jnp.full((3, 4), 0.5), 'bias': jnp.full((4,), 0.1)},
          'online_probe': {'kernel': jnp.full((4, 2), 0.2)}}


def grads():
  return {'conv': {'kernel': jnp.arange(12.0).reshape(3, 4) / 10, 'bias': jnp.ones(4)},
          'online_probe': {'kernel': jnp.full((4, 2), 0.3)}}


def test_lars_matches_simclr_formula():
  """SimCLR lars_optimizer.py: g += wd*w; lr_t = lr * eta*|w|/|g|; v = m*v + lr_t*g; w -= v."""
  lr, wd, eta, momentum = 0.5, 1e-2, 0.001, 0.9
  tx = optim.build_optimizer(
      config(name='lars', weight_decay=wd, trust_coefficient=eta, momentum=momentum),
      optax.constant_schedule(lr))
  p, state = params(), None
  state = tx.init(p)
  velocity = {k: {n: np.zeros_like(v) for n, v in d.items()} for k, d in p.items()}
  want = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in p.items()}
  for _ in range(3):
    updates, state = tx.update(grads(), state, p)
    p = optax.apply_updates(p, updates)
    for k, d in want.items():
      for n, w in d.items():
        g = np.asarray(grads()[k][n])
        adapted = n == 'kernel' and k != 'online_probe'  # Biases and the probe are exempt.
        if adapted:
          g = g + wd * w
          g = g * eta * np.linalg.norm(w) / np.linalg.norm(g)
        velocity[k][n] = momentum * velocity[k][n] + lr * g
        d[n] = w - velocity[k][n]
  for k, d in want.items():
    for n, w in d.items():
      np.testing.assert_allclose(p[k][n], w, rtol=1e-5, err_msg=f'{k}/{n}')


def test_adamw_decays_kernels_only():
  tx = optim.build_optimizer(config(name='adamw', weight_decay=0.5, b1=0.0, b2=0.0),
                             optax.constant_schedule(0.1))
  zero = {k: {n: jnp.zeros_like(v) for n, v in d.items()} for k, d in params().items()}
  updates, _ = tx.update(zero, tx.init(params()), params())  # Zero gradient: decay only.
  np.testing.assert_allclose(updates['conv']['kernel'], -0.1 * 0.5 * 0.5)
  np.testing.assert_array_equal(updates['conv']['bias'], 0.0)
  np.testing.assert_array_equal(updates['online_probe']['kernel'], 0.0)


def test_warmup_cosine_schedule():
  schedule = optim.learning_rate_schedule(config(warmup_steps=10, min_lr=0.0), 2.0, 110)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 1.0)
  np.testing.assert_allclose(float(schedule(10)), 2.0)
  np.testing.assert_allclose(float(schedule(60)), 1.0, rtol=1e-6)  # Half way down the cosine.
  np.testing.assert_allclose(float(schedule(110)), 0.0, atol=1e-7)


def test_peak_lr_scaling_and_errors():
  assert optim.peak_learning_rate(config(lr=0.3, lr_scaling='linear'), 4096) == pytest.approx(4.8)
  assert optim.peak_learning_rate(config(lr=0.3, lr_scaling='none'), 4096) == 0.3
  with pytest.raises(ValueError, match='lr_scaling'):
    optim.peak_learning_rate(config(lr_scaling='cubic'), 256)
  with pytest.raises(ValueError, match='optim.name'):
    optim.build_optimizer(config(name='adagrad'), optax.constant_schedule(1.0))
