"""Stride-2 convolutions rewritten for XLA:CPU: same values and gradients, no dilated conv."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ssl_jax import xla_options
from ssl_jax.models import resnet, strided_conv
from tests.test_xla_options import resnet_loss

NHWC = ('NHWC', 'HWIO', 'NHWC')


def numpy_input_gradient(dy: np.ndarray, w: np.ndarray, height: int, width: int) -> np.ndarray:
  """d(sum(conv(x, w) * dy))/dx of a k x k stride-2 conv padded by k // 2: each tap scattered."""
  k, pad = w.shape[0], w.shape[0] // 2
  rows, cols = dy.shape[1:3]
  dx = np.zeros((dy.shape[0], height + 2 * pad + 1, width + 2 * pad + 1, w.shape[2]))
  for a in range(k):
    for b in range(k):
      # Output (i, j) read padded input (2i + a, 2j + b) through w[a, b].
      dx[:, a:a + 2 * rows:2, b:b + 2 * cols:2] += np.einsum('nijo,co->nijc', dy, w[a, b])
  return dx[:, pad:pad + height, pad:pad + width]


@pytest.mark.parametrize('height,width,kernel', [
    (8, 6, 3), (32, 32, 3), (7, 7, 3), (8, 6, 1), (7, 9, 1)])
def test_values_and_gradients_equal_xla_and_numpy(height, width, kernel):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, height, width, 5))
  w = jax.random.normal(kw, (kernel, kernel, 5, 4))
  pad = ((kernel // 2,) * 2,) * 2
  numbers = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)  # What nnx.Conv passes.

  def ours(x, w):
    return strided_conv.conv_general_dilated(x, w, (2, 2), pad, dimension_numbers=numbers)

  def xla(x, w):
    return lax.conv_general_dilated(x, w, (2, 2), pad, dimension_numbers=NHWC)

  dy = jax.random.normal(kg, xla(x, w).shape)
  np.testing.assert_allclose(ours(x, w), xla(x, w), rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda x, w: jnp.sum(ours(x, w) * dy), (0, 1))(x, w)
  expected = jax.grad(lambda x, w: jnp.sum(xla(x, w) * dy), (0, 1))(x, w)
  for got, want in zip(grads, expected, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(
      grads[0], numpy_input_gradient(np.asarray(dy, np.float64), np.asarray(w, np.float64),
                                     height, width), rtol=1e-5, atol=1e-4)


def dilated_convolutions(fn, *args) -> int:
  """How many convolutions of `fn`'s lowered StableHLO dilate their input (a strided conv's
  transpose, as jax derives it)."""
  dilations = re.findall(r'lhs_dilate = \[([\d, ]+)\]', jax.jit(fn).lower(*args).as_text())
  return sum(any(int(d) > 1 for d in found.split(',')) for found in dilations)


def test_input_gradients_convolve_without_dilation_on_cpu_only(monkeypatch):
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))

  def grad(conv):
    return jax.grad(lambda x: jnp.sum(conv(x, w, (2, 2), ((1, 1), (1, 1)),
                                           dimension_numbers=NHWC)))

  assert dilated_convolutions(grad(lax.conv_general_dilated), x) == 1
  assert dilated_convolutions(grad(strided_conv.conv_general_dilated), x) == 0
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert dilated_convolutions(grad(strided_conv.conv_general_dilated), x) == 1


def test_other_convolutions_are_xlas(monkeypatch):
  calls = []
  monkeypatch.setattr(lax, 'conv_general_dilated',
                      lambda *args, **kwargs: calls.append((args, kwargs)) or 0)
  x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  for strides, padding in (((1, 1), ((1, 1), (1, 1))), ((2, 2), 'SAME'), ((2, 2), ((0, 1),) * 2)):
    calls.clear()
    strided_conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)
    assert calls == [((x, w, strides, padding, None, None, NHWC, 1), {'precision': None})]


def test_resnet_gradients_equal_xlas_strided_convolutions(monkeypatch):
  """ResNet-18 w16 at 16 px (three stride-2 stages, projection shortcuts): same loss, grads."""
  def value_and_grad():  # The convs take `conv_general_dilated` when the model is built.
    loss, params = resnet_loss()
    return jax.jit(jax.value_and_grad(loss),
                   compiler_options=xla_options.step_options('cpu'))(params)

  ours = value_and_grad()
  monkeypatch.setattr(resnet, 'conv_general_dilated', lax.conv_general_dilated)
  xla = value_and_grad()
  np.testing.assert_allclose(ours[0], xla[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(xla[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
