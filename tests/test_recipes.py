"""Recipe values that the reference code fixes, each checked by what it does."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import bert_mlm, simclr_resnet
from ssl_jax import losses, optim
from ssl_jax.methods import simclr


def numpy_adamw_clipped(grads_seq, w, *, lr, b1, b2, eps, wd, clip):
  """AdamW (bias-corrected, decoupled decay) on gradients clipped to global norm `clip`."""
  m, v = np.zeros_like(w), np.zeros_like(w)
  for t, g in enumerate(grads_seq, start=1):
    g = g * min(1.0, clip / np.linalg.norm(g))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    w = w - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * w)
  return w


def test_bert_optimizer_clips_the_global_gradient_norm_at_one():
  """google-research/bert optimization.py: clip_by_global_norm(grads, 1.0), then AdamWeightDecay.

  A large first gradient (norm 100) and a small second one (norm ~0.5): Adam's
  first step is scale-free, but the second step's direction depends on how
  big the first gradient was, so an unclipped optimizer lands elsewhere.
  """
  config = bert_mlm.get_config()
  assert config.optim.grad_clip_norm == 1.0 and config.optim.grad_clip_scope == 'global'
  lr = 1e-2
  tx = optim.build_optimizer(config.optim, optax.constant_schedule(lr))
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(4, 5)).astype(np.float32)
  big = rng.normal(size=(4, 5))
  big *= 100 / np.linalg.norm(big)
  small = rng.normal(size=(4, 5))
  small *= 0.5 / np.linalg.norm(small)
  params = {'dense': {'kernel': jnp.asarray(w0)}}
  state = tx.init(params)
  for g in (big, small):
    updates, state = tx.update({'dense': {'kernel': jnp.asarray(g, jnp.float32)}}, state, params)
    params = optax.apply_updates(params, updates)
  o = config.optim
  want = numpy_adamw_clipped([big, small], w0.astype(np.float64), lr=lr, b1=o.b1, b2=o.b2,
                             eps=o.eps, wd=o.weight_decay, clip=1.0)
  unclipped = numpy_adamw_clipped([big, small], w0.astype(np.float64), lr=lr, b1=o.b1,
                                  b2=o.b2, eps=o.eps, wd=o.weight_decay, clip=np.inf)
  assert np.abs(want - unclipped).max() > 1e-3  # The check can tell the two apart.
  np.testing.assert_allclose(params['dense']['kernel'], want, rtol=1e-5, atol=1e-6)


def test_simclr_cifar10_uses_the_official_commands_weight_decay():
  """google-research/simclr README, CIFAR-10 command: --weight_decay=1e-4 (ImageNet: 1e-6)."""
  assert simclr_resnet.get_config('cifar10').optim.weight_decay == 1e-4
  assert simclr_resnet.get_config().optim.weight_decay == 1e-6


def numpy_simclr_objective(h1, h2, tau):
  """tf2/objective.py add_contrastive_loss: mean over the batch of loss_a + loss_b."""
  h1 = h1 / np.linalg.norm(h1, axis=1, keepdims=True)
  h2 = h2 / np.linalg.norm(h2, axis=1, keepdims=True)
  n = len(h1)
  large = 1e9 * np.eye(n)

  def cross_entropy(logits):  # Row i's label is column i (its positive in the other view).
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(n), np.arange(n)]

  loss_a = cross_entropy(np.concatenate([h1 @ h2.T / tau, h1 @ h1.T / tau - large], axis=1))
  loss_b = cross_entropy(np.concatenate([h2 @ h1.T / tau, h2 @ h2.T / tau - large], axis=1))
  return np.mean(loss_a + loss_b)


def test_simclr_objective_is_the_references_sum_of_two_directions():
  """The method optimises loss_a + loss_b (objective.py), twice ntxent_loss's 2N-anchor mean."""
  rng = np.random.default_rng(3)
  z1, z2 = rng.normal(size=(2, 12, 8))
  objective = float(simclr.contrastive_objective(jnp.asarray(z1), jnp.asarray(z2), 0.5))
  np.testing.assert_allclose(objective, numpy_simclr_objective(z1, z2, 0.5), rtol=1e-5)
  np.testing.assert_allclose(
      objective, 2 * float(losses.ntxent_loss(jnp.asarray(z1), jnp.asarray(z2), 0.5)), rtol=1e-6)


@pytest.mark.slow  # 27 s: a ResNet compile.
def test_simclr_method_optimises_twice_ntxent():
  """The SimCLR method's contrastive loss is 2 x ntxent_loss of its own projections."""
  from flax import nnx

  from ssl_jax import methods, sharding

  config = simclr_resnet.get_config('local')
  method = methods.create(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    model = method.build(nnx.Rngs(0))
  rng = np.random.default_rng(0)
  size, channels = config.augment.size, config.data.channels
  batch = {'views': jnp.asarray(rng.integers(0, 256, (16, 2, size, size, channels), np.uint8)),
           'label': jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
  key = jax.random.key(1)
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    reference = nnx.clone(model)
    _, metrics = method.loss_fn(model, batch, key, jnp.asarray(0))
    views = method._views(batch['views'], key)  # The same colour as inside loss_fn.
    features = reference.encoder(views.reshape(32, *views.shape[2:]), train=True)['pooled']
    z = reference.projector(features, train=True).reshape(16, 2, -1)
  ntxent = float(losses.ntxent_loss(z[:, 0], z[:, 1], config.model.temperature))
  np.testing.assert_allclose(float(metrics['loss']), 2 * ntxent, rtol=1e-5)


def test_simclr_zero_init_residual_is_the_papers_in_paper_variants_only():
  """SimCLR's resnet.py zero-inits each block's last BN; the CPU-scale :local chooses not to."""
  assert simclr_resnet.get_config().model.zero_init_residual is True
  assert simclr_resnet.get_config('cifar10').model.zero_init_residual is True
  assert simclr_resnet.get_config('local').model.zero_init_residual is False
