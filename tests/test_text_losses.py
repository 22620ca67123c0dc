"""Language-model losses against an independent float64 NumPy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_jax import losses
from tests import hand_written_forms


def numpy_cross_entropy(logits_row: np.ndarray, label: int) -> float:
  """-log softmax(logits_row)[label], in float64 with the max subtracted."""
  row = logits_row.astype(np.float64)
  shifted = row - row.max()
  return float(np.log(np.exp(shifted).sum()) - shifted[label])


def numpy_next_token_loss(logits, tokens, weights=None) -> float:
  """Loop over every (b, t) predicting tokens[b, t+1] from logits[b, t]."""
  batch, length = tokens.shape
  total, count = 0.0, 0.0
  for b in range(batch):
    for t in range(length - 1):
      w = 1.0 if weights is None else float(weights[b, t + 1])
      if w:
        total += w * numpy_cross_entropy(logits[b, t], tokens[b, t + 1])
        count += w
  return total / count


def numpy_masked_lm_loss(logits, labels, weights) -> float:
  """Loop over the positions whose weight is 1."""
  total, count = 0.0, 0
  for b, t in zip(*np.nonzero(weights), strict=True):
    total += numpy_cross_entropy(logits[b, t], labels[b, t])
    count += 1
  return total / count


def random_lm_batch(seed, batch=3, length=7, vocab=11, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.normal(size=(batch, length, vocab))).astype(np.float32)
  tokens = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  return rng, logits, tokens


def test_next_token_loss_matches_numpy():
  _, logits, tokens = random_lm_batch(0)
  got = float(losses.next_token_loss(logits, tokens))
  np.testing.assert_allclose(got, numpy_next_token_loss(logits, tokens), rtol=1e-5)
  # The shift matters: scoring logits[:, t] against tokens[:, t] gives another number.
  unshifted = np.mean([numpy_cross_entropy(logits[b, t], tokens[b, t])
                       for b in range(3) for t in range(7)])
  assert abs(got - unshifted) > 1e-2


def test_next_token_loss_takes_the_predicting_positions_alone():
  """(B, T-1, V) logits, those of positions with a target, give the (B, T, V) loss."""
  _, logits, tokens = random_lm_batch(2)
  np.testing.assert_array_equal(losses.next_token_loss(logits[:, :-1], tokens),
                                losses.next_token_loss(logits, tokens))
  with pytest.raises(ValueError, match=r'in \(B, T\) or \(B, T-1\)'):
    losses.next_token_loss(logits[:, :-2], tokens)


def test_next_token_loss_padding_never_counts():
  rng, logits, tokens = random_lm_batch(1)
  # Right padding: the last 3 tokens of row 0 and the last token of row 2 are pads.
  weights = np.ones(tokens.shape, np.float32)
  weights[0, 4:] = 0
  weights[2, 6:] = 0
  want = numpy_next_token_loss(logits, tokens, weights)
  got = float(losses.next_token_loss(logits, tokens, weights))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Whatever sits at padded targets (an ignore id, an out-of-range id) changes nothing.
  garbage = tokens.copy()
  garbage[0, 4:] = -100
  garbage[2, 6] = 10_000
  np.testing.assert_allclose(float(losses.next_token_loss(logits, garbage, weights)), want,
                             rtol=1e-5)
  # Nor do the logits that would have predicted padding.
  noisy = logits.copy()
  noisy[0, 3:] = rng.normal(size=noisy[0, 3:].shape) * 100
  np.testing.assert_allclose(float(losses.next_token_loss(noisy, tokens, weights)), want,
                             rtol=1e-5)
  # weights[:, 0] is the weight of no target: changing it changes nothing.
  weights[1, 0] = 0
  np.testing.assert_allclose(float(losses.next_token_loss(logits, tokens, weights)), want,
                             rtol=1e-5)


def test_masked_lm_loss_matches_numpy_and_ignores_unchosen():
  rng, logits, labels = random_lm_batch(2, length=9)
  weights = (rng.uniform(size=labels.shape) < 0.3).astype(np.float32)
  weights[0, 0] = 1  # At least one chosen position.
  want = numpy_masked_lm_loss(logits, labels, weights)
  got = float(losses.masked_lm_loss(logits, labels, weights))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # HF-style ignore ids (-100) at unchosen positions give the same loss, not NaN.
  ignored = np.where(weights > 0, labels, -100)
  np.testing.assert_allclose(float(losses.masked_lm_loss(logits, ignored, weights)), want,
                             rtol=1e-5)
  # The mean is over chosen positions, not over all tokens.
  all_positions = numpy_masked_lm_loss(logits, labels, np.ones_like(weights))
  assert abs(got - all_positions) > 1e-3


def test_losses_are_float32_for_bfloat16_logits_and_stable():
  _, logits, tokens = random_lm_batch(3)
  # A large common offset would overflow a naive exp; bfloat16 inputs are upcast.
  shifted = (logits + 1e4).astype(np.float32)
  got = losses.next_token_loss(jnp.asarray(shifted), tokens)
  np.testing.assert_allclose(float(got), numpy_next_token_loss(logits, tokens), rtol=1e-2)
  low = losses.next_token_loss(jnp.asarray(logits, jnp.bfloat16), tokens)
  assert low.dtype == jnp.float32
  rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_allclose(float(low), numpy_next_token_loss(rounded, tokens), rtol=1e-5)


def test_no_counted_token_gives_zero_loss_and_finite_gradient():
  _, logits, labels = random_lm_batch(4)
  zeros = np.zeros(labels.shape, np.float32)
  loss, grad = jax.jit(jax.value_and_grad(losses.masked_lm_loss))(logits, labels, zeros)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(np.asarray(grad), 0.0)
  loss = losses.next_token_loss(logits, labels, zeros)
  assert float(loss) == 0.0


def test_gradient_matches_softmax_minus_one_hot():
  _, logits, tokens = random_lm_batch(5, batch=2, length=4, vocab=5)
  weights = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)  # 2 + 3 = 5 targets
  grad = np.asarray(jax.jit(jax.grad(losses.next_token_loss))(logits, tokens, weights))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.zeros_like(logits)
  for b in range(2):
    for t in range(3):
      if weights[b, t + 1]:
        want[b, t] = (probs[b, t] - np.eye(5)[tokens[b, t + 1]]) / 5
  np.testing.assert_allclose(grad, want, atol=1e-6)


@pytest.mark.parametrize('fn', ['next_token_loss', 'masked_lm_loss'])
def test_shape_mismatch_is_a_clear_error(fn):
  logits = np.zeros((2, 5, 7), np.float32)
  tokens = np.zeros((2, 4), np.int32)
  with pytest.raises(ValueError, match='must agree|do not match'):
    if fn == 'next_token_loss':
      losses.next_token_loss(logits, tokens)
    else:
      losses.masked_lm_loss(logits, tokens, np.ones((2, 4), np.float32))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_optax_cross_entropy_equals_the_hand_written_one(dtype):
  """optax's CE with `where`: the same loss and gradient as the former logsumexp - gather."""
  rng, logits, tokens = random_lm_batch(5, batch=4, length=9, vocab=13)
  chosen = (rng.random(tokens.shape) < 0.5).astype(np.float32)
  weights = chosen * rng.choice([1.0, 0.5], tokens.shape)  # Weights other than 1 too.
  labels = np.where(weights > 0, tokens, -100)  # Ignored labels hold anything.
  logits = jnp.asarray(logits, dtype)
  for w in (weights, np.zeros_like(weights)):  # Also with no counted token.
    value_and_grad = jax.jit(jax.value_and_grad(losses.masked_lm_loss))
    got, got_grad = value_and_grad(logits, labels, w)
    want, want_grad = jax.value_and_grad(hand_written_forms.weighted_token_cross_entropy)(
        logits, labels, w)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(np.float32(got_grad), np.float32(want_grad), rtol=1e-6, atol=1e-9)
    assert np.isfinite(np.float32(got_grad)).all()
  next_token = jax.grad(losses.next_token_loss)(logits, tokens, weights)
  want = jax.grad(lambda x: hand_written_forms.weighted_token_cross_entropy(
      x[:, :-1], tokens[:, 1:], weights[:, 1:]))(logits)
  np.testing.assert_allclose(np.float32(next_token), np.float32(want), rtol=1e-6, atol=1e-9)
