"""Losses against independent NumPy implementations of the papers' formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ssl_jax import losses
from ssl_jax.models.heads import probe_loss_and_accuracy


def numpy_patchify(images: np.ndarray, p: int) -> np.ndarray:
  """MAE's patchify, written as the reference code does it (NCHW reshape + einsum)."""
  nchw = images.transpose(0, 3, 1, 2)
  n, c, height, width = nchw.shape
  h, w = height // p, width // p
  x = nchw.reshape(n, c, h, p, w, p)
  x = np.einsum('nchpwq->nhwpqc', x)
  return x.reshape(n, h * w, p * p * c)


def numpy_mae_loss(pred, target, mask, norm_pix_loss):
  """models_mae.py forward_loss, with explicit loops over samples and patches."""
  total, count = 0.0, 0.0
  for b in range(pred.shape[0]):
    for i in range(pred.shape[1]):
      t = target[b, i].astype(np.float64)
      if norm_pix_loss:
        var = np.sum((t - t.mean()) ** 2) / (t.size - 1)  # unbiased, as torch.var
        t = (t - t.mean()) / np.sqrt(var + 1e-6)
      err = np.mean((pred[b, i] - t) ** 2)
      total += err * mask[b, i]
      count += mask[b, i]
  return total / count


@pytest.mark.parametrize('channels', [1, 3])
def test_patchify_matches_reference_order(channels):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 8, 12, channels)).astype(np.float32)
  got = np.asarray(losses.patchify(images, 4))
  np.testing.assert_array_equal(got, numpy_patchify(images, 4))
  assert got.shape == (2, 6, 16 * channels)
  # Patch 1 is row 0, column 1; its first value is pixel (0, 4), channel 0.
  assert got[0, 1, 0] == images[0, 0, 4, 0]
  np.testing.assert_array_equal(np.asarray(losses.unpatchify(got, 4, 8, 12)), images)


def test_patchify_rejects_indivisible_size():
  with pytest.raises(ValueError, match='not divisible by the patch size'):
    losses.patchify(np.zeros((1, 10, 8, 3), np.float32), 4)


@pytest.mark.parametrize('norm_pix_loss', [True, False])
def test_mae_loss_matches_numpy(norm_pix_loss):
  rng = np.random.default_rng(1)
  pred = rng.normal(size=(3, 16, 12)).astype(np.float32)
  target = rng.normal(loc=2.0, scale=3.0, size=(3, 16, 12)).astype(np.float32)
  mask = (rng.uniform(size=(3, 16)) < 0.75).astype(np.float32)
  got = float(losses.mae_loss(pred, target, mask, norm_pix_loss))
  want = numpy_mae_loss(pred, target, mask, norm_pix_loss)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_mae_loss_ignores_visible_patches_and_uses_unbiased_variance():
  target = np.tile(np.array([0.0, 1.0, 2.0, 3.0], np.float32), (1, 2, 1))  # (1, 2, 4)
  pred = np.zeros_like(target)
  pred[0, 0] = 100.0  # Visible patch: a huge error that must not count.
  mask = np.array([[0.0, 1.0]], np.float32)
  # Unbiased variance of [0, 1, 2, 3] is 5/3; the normalised target's mean square is 3/5*5/4.
  normalised = (target[0, 1] - 1.5) / np.sqrt(5 / 3 + 1e-6)
  want = np.mean(normalised ** 2)
  np.testing.assert_allclose(float(losses.mae_loss(pred, target, mask, True)), want, rtol=1e-6)
  biased = (target[0, 1] - 1.5) / np.sqrt(1.25 + 1e-6)
  assert abs(want - np.mean(biased ** 2)) > 0.1  # The two conventions really differ here.
  np.testing.assert_allclose(float(losses.mae_loss(pred, target, mask, False)),
                             np.mean(target[0, 1] ** 2), rtol=1e-6)


def numpy_ntxent(z1, z2, tau):
  """NT-Xent written from the paper's formula, one anchor at a time."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  n = len(z1)
  total = 0.0
  for i in range(2 * n):
    j = (i + n) % (2 * n)  # The other view of the same example.
    sim = np.array([z[i] @ z[k] / (np.linalg.norm(z[i]) * np.linalg.norm(z[k]))
                    for k in range(2 * n)])
    denominator = sum(np.exp(sim[k] / tau) for k in range(2 * n) if k != i)
    total += -np.log(np.exp(sim[j] / tau) / denominator)
  return total / (2 * n)


@pytest.mark.parametrize('tau', [0.1, 0.5])
def test_ntxent_matches_numpy(tau):
  rng = np.random.default_rng(2)
  z1, z2 = rng.normal(size=(2, 6, 5)).astype(np.float32)
  np.testing.assert_allclose(float(losses.ntxent_loss(z1, z2, tau)), numpy_ntxent(z1, z2, tau),
                             rtol=1e-5)


def test_ntxent_prefers_aligned_views_and_ignores_scale():
  rng = np.random.default_rng(3)
  z1 = rng.normal(size=(8, 16)).astype(np.float32)
  aligned = float(losses.ntxent_loss(z1, 3.0 * z1, 0.1))  # Cosine similarity ignores scale.
  np.testing.assert_allclose(aligned, float(losses.ntxent_loss(z1, z1, 0.1)), rtol=1e-4)
  shuffled = float(losses.ntxent_loss(z1, z1[::-1], 0.1))
  assert aligned < shuffled


def test_ntxent_negatives_span_the_sharded_global_batch():
  """With the batch split over 8 devices, every device's rows are negatives of every other's."""
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(4)
  z1, z2 = rng.normal(size=(2, 16, 8)).astype(np.float32)
  rows = NamedSharding(mesh, PartitionSpec('data'))
  sharded = jax.jit(losses.ntxent_loss, static_argnums=2)(
      jax.device_put(z1, rows), jax.device_put(z2, rows), 0.1)
  np.testing.assert_allclose(float(sharded), numpy_ntxent(z1, z2, 0.1), rtol=1e-5)
  per_device = np.mean([numpy_ntxent(z1[i:i + 2], z2[i:i + 2], 0.1) for i in range(0, 16, 2)])
  assert abs(float(sharded) - per_device) > 0.1  # Local-only negatives would give this.


def test_online_probe_loss_ignores_unlabelled_examples():
  """heads.probe_loss_and_accuracy against NumPy: mean CE and top-1 over labels >= 0."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
  labels = np.array([0, 3, -1, 2, -1, 1])
  loss, accuracy = probe_loss_and_accuracy(jnp.asarray(logits), jnp.asarray(labels))
  keep = labels >= 0
  shifted = logits - logits.max(1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  expected = -log_probs[keep, labels[keep]].mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(accuracy) == np.mean(logits[keep].argmax(1) == labels[keep])
  assert np.isfinite(float(probe_loss_and_accuracy(jnp.asarray(logits), -np.ones(6, int))[0]))
