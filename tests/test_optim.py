"""Optimizers and schedules against hand-written formulas."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ssl_jax import config_blocks, optim
from tests import hand_written_forms


def config(**overrides) -> ml_collections.ConfigDict:
  return config_blocks.optim_config(**overrides)


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
  # simclr tf2/model.py L95: base_learning_rate * math.sqrt(train_batch_size).
  assert optim.peak_learning_rate(config(lr=0.005, lr_scaling='sqrt'), 1024) == pytest.approx(0.16)
  with pytest.raises(ValueError, match='lr_scaling'):
    optim.peak_learning_rate(config(lr_scaling='cubic'), 256)
  with pytest.raises(ValueError, match='optim.name'):
    optim.build_optimizer(config(name='adagrad'), optax.constant_schedule(1.0))


# ------------------------------------------------------------ DINO's additions ---


def dino_cosine_scheduler(base, final, steps):
  """utils.cosine_scheduler of facebookresearch/dino without warmup, one value per step."""
  iters = np.arange(steps)
  return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))


def test_new_keys_are_neutral_by_default():
  default = optim.build_optimizer(config(name='adamw', weight_decay=0.1),
                                  optax.constant_schedule(0.1))
  plain = optax.adamw(optax.constant_schedule(0.1), weight_decay=0.1, mask=optim.decay_mask)
  assert (jax.tree.structure(default.init(params())) == jax.tree.structure(plain.init(params())))
  assert optim.weight_decay_schedule(config(weight_decay=0.3)) == 0.3


def test_weight_decay_follows_dino_cosine():
  schedule = optim.weight_decay_schedule(config(weight_decay=0.04, weight_decay_end=0.4,
                                                weight_decay_steps=100))
  np.testing.assert_allclose([float(schedule(i)) for i in range(100)],
                             dino_cosine_scheduler(0.04, 0.4, 100), rtol=1e-5)
  np.testing.assert_allclose(float(schedule(500)), 0.4, rtol=1e-6)  # Stays at the end value.
  # AdamW applies it by step: with zero gradients the update is -lr * wd(step) * w on kernels.
  tx = optim.build_optimizer(config(name='adamw', weight_decay=0.04, weight_decay_end=0.4,
                                    weight_decay_steps=4), optax.constant_schedule(0.5))
  zero = jax.tree.map(jnp.zeros_like, params())
  state = tx.init(params())
  for step in range(3):
    updates, state = tx.update(zero, state, params())
    want = -0.5 * dino_cosine_scheduler(0.04, 0.4, 4)[step] * 0.5
    np.testing.assert_allclose(updates['conv']['kernel'], want, rtol=1e-5)
    np.testing.assert_array_equal(updates['conv']['bias'], 0.0)
  with pytest.raises(ValueError, match='weight_decay_steps'):
    optim.weight_decay_schedule(config(weight_decay_end=0.4))


def test_optax_weight_decay_cosine_equals_the_hand_written_one():
  """DINO's weight-decay cosine: optax form against the former formula, boundaries included."""
  for start, end, length in [(0.04, 0.4, 100), (0.0, 0.4, 7), (0.4, 0.04, 1), (0.05, 0.05, 3)]:
    schedule = optim.weight_decay_schedule(config(weight_decay=start, weight_decay_end=end,
                                                  weight_decay_steps=length))
    oracle = hand_written_forms.weight_decay_cosine(start, end, length)
    steps = jnp.asarray(sorted({0, 1, 2, length // 2, length - 1, length, length + 1,
                                10 * length}), jnp.int32)
    np.testing.assert_allclose(jax.jit(jax.vmap(schedule))(steps), jax.vmap(oracle)(steps),
                               rtol=1e-6, atol=1e-9, err_msg=f'{start} -> {end} in {length}')
    np.testing.assert_allclose(float(schedule(jnp.asarray(length))), end, rtol=1e-6)


def test_per_parameter_clipping_matches_dino():
  """utils.clip_gradients: each tensor scaled by clip / (|g| + 1e-6) when that is < 1."""
  tx = optim.build_optimizer(config(name='sgd', momentum=0.0, grad_clip_norm=1.0,
                                    grad_clip_scope='per_parameter'),
                             optax.constant_schedule(1.0))
  g = grads()  # |kernel| = 2.25, |bias| = 2, |probe| = 0.85
  updates, _ = tx.update(g, tx.init(params()), params())
  for (module, name), norm in {('conv', 'kernel'): 2.25, ('conv', 'bias'): 2.0,
                               ('online_probe', 'kernel'): 0.3 * np.sqrt(8)}.items():
    raw = np.asarray(g[module][name])
    np.testing.assert_allclose(np.linalg.norm(raw), norm, rtol=1e-3)
    scale = min(1.0, 1.0 / (np.linalg.norm(raw) + 1e-6))
    np.testing.assert_allclose(updates[module][name], -raw * scale, rtol=1e-5)
  with pytest.raises(ValueError, match='grad_clip_scope'):
    optim.build_optimizer(config(grad_clip_norm=1.0, grad_clip_scope='layer'),
                          optax.constant_schedule(1.0))


def frozen_params():
  return {'mlp': {'kernel': jnp.full((3, 4), 0.5)},
          'last_layer': {'kernel': jnp.full((4, 2), 0.2)}}


def test_frozen_last_layer_gets_nothing_then_a_fresh_adam():
  """cancel_gradients_last_layer: no update, no decay, and torch's per-tensor Adam step."""
  lr = optax.linear_schedule(0.1, 0.2, 10)
  wd = dict(weight_decay=0.04, weight_decay_end=0.4, weight_decay_steps=10)
  tx = optim.build_optimizer(config(name='adamw', freeze_steps=3, **wd), lr)
  reference = optim.build_optimizer(config(name='adamw', **wd), lr)  # Nothing frozen.
  rng = np.random.default_rng(0)
  p = q = frozen_params()
  state, ref_state = tx.init(p), reference.init(q)
  wd_schedule = optim.weight_decay_schedule(config(**wd))
  fresh = optax.adamw(lambda c: lr(c + 3), weight_decay=lambda c: wd_schedule(c + 3),
                      mask=optim.decay_mask)
  fresh_state = fresh.init(p['last_layer'])
  for step in range(6):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
    updates, state = tx.update(g, state, p)
    ref_updates, ref_state = reference.update(g, ref_state, q)
    # The rest of the model trains exactly as without freezing.
    np.testing.assert_allclose(updates['mlp']['kernel'], ref_updates['mlp']['kernel'], rtol=1e-5,
                               atol=1e-8)
    if step < 3:
      np.testing.assert_array_equal(updates['last_layer']['kernel'], 0.0)
    else:
      # From step 3 on: a fresh AdamW on the last layer, at the global lr and wd.
      want, fresh_state = fresh.update(g['last_layer'], fresh_state, p['last_layer'])
      np.testing.assert_allclose(updates['last_layer']['kernel'], want['kernel'], rtol=1e-5)
    p = optax.apply_updates(p, updates)
    q = optax.apply_updates(q, ref_updates)
  with pytest.raises(ValueError, match='adamw'):
    optim.build_optimizer(config(name='lars', freeze_steps=3), lr)


def dino_head_params():
  return {'head': {'mlp': {'kernel': jnp.full((3, 4), 0.5), 'bias': jnp.full((4,), 0.1)},
                   'last_layer': {'kernel': jnp.full((4, 2), 0.2), 'scale': jnp.ones((1, 2))}}}


def test_optax_partition_freezing_equals_the_hand_written_adam():
  """optax.partition + conditionally_mask against the former late-start Adam, across the thaw."""
  lr = optax.linear_schedule(0.1, 0.2, 10)
  cfg = config(name='adamw', freeze_steps=3, weight_decay=0.04, weight_decay_end=0.4,
               weight_decay_steps=10)
  tx, oracle = optim.build_optimizer(cfg, lr), hand_written_forms.frozen_adamw(cfg, lr)
  update, oracle_update = jax.jit(tx.update), jax.jit(oracle.update)
  p = q = dino_head_params()
  state, oracle_state = tx.init(p), oracle.init(q)
  rng = np.random.default_rng(0)
  for step in range(8):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), p)
    updates, state = update(g, state, p)
    want, oracle_state = oracle_update(g, oracle_state, q)
    p, q = optax.apply_updates(p, updates), optax.apply_updates(q, want)
    for got, wanted in zip(jax.tree.leaves(updates), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(got, wanted, rtol=1e-6, atol=1e-7, err_msg=f'step {step}')
    if step < 3:
      np.testing.assert_array_equal(updates['head']['last_layer']['kernel'], 0.0)
    # The frozen layer's Adam moments: zero while frozen (torch never creates them), then alike.
    frozen = state.inner_states['frozen'].inner_state
    adam, oracle_adam = frozen.inner_state[0], oracle_state[1]
    assert int(adam.count) == max(step - 2, 0)  # Counts from the thaw, as torch's per-tensor step.
    for moment in ('mu', 'nu'):
      np.testing.assert_allclose(getattr(adam, moment)['head']['last_layer']['kernel'],
                                 getattr(oracle_adam, moment)['head']['last_layer']['kernel'],
                                 rtol=1e-6, atol=1e-9)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p, q)
  assert np.abs(p['head']['last_layer']['kernel'] - 0.2).max() > 1e-2  # It did thaw.


def test_decay_mask_exempts_biases_of_any_rank_norms_and_the_probe():
  z = np.zeros
  vit_like = {  # Shapes of ssl_jax.models.vit parameters.
      'cls_token': z((1, 1, 8)),
      'patch_embed': {'kernel': z((4, 4, 1, 8)), 'bias': z((8,))},
      'attn': {'qkv': {'kernel': z((8, 3, 2, 4)), 'bias': z((3, 2, 4))},
               'proj': {'kernel': z((2, 4, 8)), 'bias': z((8,))}},
      'norm': {'scale': z((8,)), 'bias': z((8,))},
      'online_probe': {'kernel': z((8, 10)), 'bias': z((10,))},
  }
  assert optim.decay_mask(vit_like) == {
      'cls_token': True,  # (1, 1, D): decayed, as MAE pretraining does.
      'patch_embed': {'kernel': True, 'bias': False},
      'attn': {'qkv': {'kernel': True, 'bias': False},  # (3, heads, head_dim): still a bias.
               'proj': {'kernel': True, 'bias': False}},
      'norm': {'scale': False, 'bias': False},
      'online_probe': {'kernel': False, 'bias': False},
  }
