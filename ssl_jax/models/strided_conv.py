"""Stride-2 convolutions with the input gradients XLA:CPU computes slowly, rewritten.

The input gradient of a stride-2 convolution is, as XLA derives it, a
convolution over the output gradient dilated by zeros (`lhs_dilation`):
three quarters of the positions are zeros, and XLA:CPU (jaxlib 0.10.2, Eigen)
runs it at ~10 GFLOP/s. In the SimCLR workload's ResNet-18 (width 16, 32 px,
batch 512: `benchmarks/conv_bench.py`'s shapes) the first stride-2 3x3
conv's input gradient took 108-114 ms against 11 ms for its forward pass.
`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (the
`nnx.Conv` argument of the same name) that, on CPU, computes:

- a 1x1 stride-2 convolution without padding (torchvision's projection
  shortcut) as the strided slice `x[:, ::2, ::2]` followed by a stride-1 1x1
  convolution: the same products and sums; the slice's gradient is a
  scatter into zeros. Input and kernel gradients at (512, 32, 32, 16) -> 32:
  30 -> 14 ms each.
- a 3x3 stride-2 convolution with padding 1 on even heights and widths: its
  forward pass and kernel gradient as XLA's, its input gradient
  (`input_gradient`) as four stride-1 convolutions of the output gradient,
  one per (row, column) parity of the input pixel (the polyphase form of a
  transposed convolution, as in Shi et al. 2016's sub-pixel convolution), no
  multiplication by a dilation zero, interleaved into the input's shape.
  (512, 32, 32, 16) -> 32: 110 -> 54 ms; 16 px 32 -> 64: 42 -> 12 ms;
  8 px 64 -> 128: 12 -> 10 ms.

Everything else (other strides, kernels, padding, dilation, groups, odd
sizes, other backends) goes to `lax.conv_general_dilated` unchanged. The
results equal XLA's to float32 rounding (`tests/test_strided_conv.py`).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _is_nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
  """Whether `dimension_numbers` (None, specs or ConvDimensionNumbers) mean NHWC x HWIO."""
  if dimension_numbers is None:
    return False  # lax's default is NCHW x OIHW.
  return (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))


def _xla_conv(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
  """XLA's 3x3 stride-2 padding-1 NHWC convolution."""
  return lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC,
                                  precision=precision)


def input_gradient(dy: jax.Array, w: jax.Array, precision: Any = None) -> jax.Array:
  """d(loss)/d(x) of `_xla_conv(x, w)` from dy (B, H/2, W/2, C_out): (B, H, W, C_in).

  With x padded by one, output row i reads input rows 2i - 1, 2i, 2i + 1
  through kernel rows 0, 1, 2. So input row 2m gets dy row m through kernel
  row 1, and input row 2m + 1 gets dy rows m and m + 1 through kernel rows 2
  and 0 (dy row H/2 is zero padding); columns alike. Each (row, column)
  parity is one stride-1 convolution with the kernel's input and output
  channels swapped ('HWOI').
  """
  batch, rows, cols, _ = dy.shape
  padded = jnp.pad(dy, ((0, 0), (0, 1), (0, 1), (0, 0)))

  def taps(parity: int, length: int) -> tuple[list[int], slice]:  # kernel taps, dy span
    return ([1], slice(0, length)) if parity == 0 else ([2, 0], slice(0, length + 1))

  phases = []
  for row_parity in (0, 1):
    row_taps, row_span = taps(row_parity, rows)
    for col_parity in (0, 1):
      col_taps, col_span = taps(col_parity, cols)
      kernel = w[jnp.array(row_taps)][:, jnp.array(col_taps)]
      phases.append(lax.conv_general_dilated(
          padded[:, row_span, col_span], kernel, (1, 1), 'VALID',
          dimension_numbers=('NHWC', 'HWOI', 'NHWC'), precision=precision))
  # phases[2 * row_parity + col_parity]: (B, H/2, W/2, C_in) -> (B, H/2, 2, W/2, 2, C_in).
  grid = jnp.stack(phases, axis=0).reshape(2, 2, batch, rows, cols, -1)
  return grid.transpose(2, 3, 0, 4, 1, 5).reshape(batch, 2 * rows, 2 * cols, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv3x3_stride2(x: jax.Array, w: jax.Array, precision: Any = None) -> jax.Array:
  """XLA's 3x3 stride-2 padding-1 convolution whose input gradient is `input_gradient`."""
  return _xla_conv(x, w, precision)


def _conv3x3_stride2_fwd(x, w, precision):
  return _xla_conv(x, w, precision), (x, w)


def _conv3x3_stride2_bwd(precision, residuals, dy):
  x, w = residuals
  _, kernel_vjp = jax.vjp(lambda w: _xla_conv(x, w, precision), w)
  return input_gradient(dy, w, precision).astype(x.dtype), kernel_vjp(dy)[0]


conv3x3_stride2.defvjp(_conv3x3_stride2_fwd, _conv3x3_stride2_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Any, padding: Any,
                         lhs_dilation: Any = None, rhs_dilation: Any = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         precision: Any = None, **kwargs: Any) -> jax.Array:
  """`lax.conv_general_dilated`, with the two stride-2 cases above rewritten on CPU."""
  plain = (jax.default_backend() == 'cpu' and tuple(window_strides) == (2, 2)
           and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
           and feature_group_count == 1 and all(v is None for v in kwargs.values())
           and not isinstance(padding, str) and lhs.ndim == 4
           and _is_nhwc(lhs, rhs, dimension_numbers))
  if plain:
    kernel = rhs.shape[:2]
    padding = tuple(tuple(p) for p in padding)
    if kernel == (1, 1) and padding == ((0, 0), (0, 0)):
      return lax.conv_general_dilated(lhs[:, ::2, ::2], rhs, (1, 1), 'VALID',
                                      dimension_numbers=NHWC, precision=precision)
    if (kernel == (3, 3) and padding == ((1, 1), (1, 1))
        and lhs.shape[1] % 2 == 0 and lhs.shape[2] % 2 == 0):
      return conv3x3_stride2(lhs, rhs, precision)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, precision=precision,
                                  **kwargs)
