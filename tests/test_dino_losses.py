"""dino_loss and dino_center against a NumPy transcription of the paper's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ssl_jax import losses


def numpy_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=-1, keepdims=True)


def numpy_dino_loss(student, teacher, center, student_temp, teacher_temp):
  """DINOLoss.forward, one pair and one example at a time, in float64.

  Returns the loss and the number of (teacher view, student view) pairs used.
  """
  student, teacher, center = (np.asarray(x, np.float64) for x in (student, teacher, center))
  total, pairs = 0.0, 0
  for t in range(teacher.shape[0]):
    targets = numpy_softmax((teacher[t] - center) / teacher_temp)  # (B, D)
    for s in range(student.shape[0]):
      if s == t:  # The same global crop: skipped.
        continue
      log_probs = np.log(numpy_softmax(student[s] / student_temp))
      per_example = [-np.sum(targets[b] * log_probs[b]) for b in range(student.shape[1])]
      total += np.mean(per_example)
      pairs += 1
  return total / pairs, pairs


def numpy_dino_center(center, teacher, momentum):
  rows = np.asarray(teacher, np.float64).reshape(-1, teacher.shape[-1])
  return center * momentum + rows.sum(axis=0, keepdims=True) / len(rows) * (1 - momentum)


def outputs(num_student, num_teacher, batch, dim, seed):
  rng = np.random.default_rng(seed)
  student = rng.normal(size=(num_student, batch, dim)).astype(np.float32)
  teacher = rng.normal(size=(num_teacher, batch, dim)).astype(np.float32)
  center = 0.3 * rng.normal(size=(1, dim)).astype(np.float32)
  return student, teacher, center


@pytest.mark.parametrize('num_local', [0, 1, 6])
def test_dino_loss_matches_numpy_with_multi_crop(num_local):
  student, teacher, center = outputs(2 + num_local, 2, 5, 16, seed=num_local)
  got = float(losses.dino_loss(student, teacher, center, 0.1, 0.04))
  want, pairs = numpy_dino_loss(student, teacher, center, 0.1, 0.04)
  assert pairs == 2 * (2 + num_local - 1)  # 2 global + n local: 2 (n + 1) pairs.
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_dino_loss_skips_exactly_the_same_view_pairs():
  """Two global crops only: the loss is the mean of the two cross-view pairs."""
  student, teacher, center = outputs(2, 2, 3, 8, seed=10)
  got = float(losses.dino_loss(student, teacher, center, 0.1, 0.04))
  cross = [_pair(student[1], teacher[0], center), _pair(student[0], teacher[1], center)]
  np.testing.assert_allclose(got, np.mean(cross), rtol=1e-5)
  same = [_pair(student[0], teacher[0], center), _pair(student[1], teacher[1], center)]
  assert abs(np.mean(cross + same) - got) > 1e-2  # Counting same-view pairs would differ.


def _pair(student_view, teacher_view, center):
  targets = numpy_softmax((teacher_view.astype(np.float64) - center) / 0.04)
  log_probs = np.log(numpy_softmax(student_view.astype(np.float64) / 0.1))
  return float(np.mean(-(targets * log_probs).sum(-1)))


def test_dino_loss_is_float32_and_stops_the_teacher_gradient():
  student, teacher, center = outputs(3, 2, 4, 8, seed=3)
  bf16 = float(losses.dino_loss(jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher),
                                center, 0.1, 0.04))
  want, _ = numpy_dino_loss(jnp.asarray(student, jnp.bfloat16).astype(np.float32), teacher,
                            center, 0.1, 0.04)
  np.testing.assert_allclose(bf16, want, rtol=1e-5)
  grad_teacher = jax.grad(losses.dino_loss, argnums=1)(student, teacher, center, 0.1, 0.04)
  grad_center = jax.grad(losses.dino_loss, argnums=2)(student, teacher, center, 0.1, 0.04)
  assert not np.any(grad_teacher) and not np.any(grad_center)
  grad_student = jax.grad(losses.dino_loss)(student, teacher, center, 0.1, 0.04)
  # Cross-entropy gradient: (softmax(s / tau_s) - mean of its teachers' targets) / (tau_s P B).
  targets = numpy_softmax((teacher.astype(np.float64) - center) / 0.04)  # (2, B, D)
  probs = numpy_softmax(student.astype(np.float64) / 0.1)  # (3, B, D)
  pairs, batch = 2 * 2, 4
  want_grad = np.zeros_like(probs)
  for s in range(3):
    for t in range(2):
      if s != t:
        want_grad[s] += (probs[s] - targets[t]) / (0.1 * pairs * batch)
  np.testing.assert_allclose(grad_student, want_grad, rtol=1e-4, atol=1e-7)


def test_dino_loss_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='global crops first'):
    losses.dino_loss(np.zeros((2, 4, 8)), np.zeros((3, 4, 8)), np.zeros((1, 8)), 0.1, 0.04)


def test_dino_center_is_an_ema_of_the_batch_mean():
  _, teacher, center = outputs(1, 2, 6, 8, seed=4)
  got = np.asarray(losses.dino_center(center, teacher, 0.9))
  assert got.shape == (1, 8) and got.dtype == np.float32
  np.testing.assert_allclose(got, numpy_dino_center(center, teacher, 0.9), rtol=1e-5, atol=1e-7)
  # Momentum 0 is the batch mean itself; 1 keeps the center.
  np.testing.assert_allclose(np.asarray(losses.dino_center(center, teacher, 0.0))[0],
                             teacher.reshape(-1, 8).mean(0), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(losses.dino_center(center, teacher, 1.0)), center)


def test_sharded_batch_gives_the_global_loss_and_center():
  """Batch split over 8 devices: the loss and the center use the whole global batch."""
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  student, teacher, center = outputs(5, 2, 16, 32, seed=5)
  rows = NamedSharding(mesh, PartitionSpec(None, 'data'))  # (views, batch, dim): batch split.
  placed_student = jax.device_put(student, rows)
  placed_teacher = jax.device_put(teacher, rows)
  assert placed_teacher.addressable_shards[0].data.shape == (2, 2, 32)

  @jax.jit
  def step(student, teacher, center):
    return (losses.dino_loss(student, teacher, center, 0.1, 0.04),
            losses.dino_center(center, teacher, 0.9))

  loss, new_center = step(placed_student, placed_teacher, center)
  np.testing.assert_allclose(float(loss), numpy_dino_loss(student, teacher, center, 0.1, 0.04)[0],
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(new_center), numpy_dino_center(center, teacher, 0.9),
                             rtol=1e-5, atol=1e-7)
  one_device_center = numpy_dino_center(center, teacher[:, :2], 0.9)  # A per-device mean.
  assert np.abs(np.asarray(new_center) - one_device_center).max() > 1e-3
