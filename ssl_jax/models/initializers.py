"""Parameter initialisers shared by the models, each named for the reference code it copies.

- `xavier_uniform`: MAE (models_mae.py `_init_weights`), with explicit fan
  axes so fused kernels such as qkv (D, 3, heads, head_dim) see torch's fans.
- `torch_trunc_normal`: DINO and timm's `trunc_normal_(std=.02)`.
- `torch_default_uniform`: torch's default Linear/Conv init (DINO's patch
  embedding, heads).
- `normal`: GPT-2 / BERT's N(0, 0.02) (and GPT-2's residual-scaled std).

A transformer's linears take a `KernelInit`: a function of (in_axis,
out_axis) that returns the initialiser, so one recipe serves kernels of any
rank (`linear_init` names the ViT's two recipes). `partitioned` attaches the
logical axis names that `ssl_jax.sharding` maps onto the mesh.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssl_jax.errors import ConfigError

Initializer = Callable[..., jax.Array]
Axes = int | tuple[int, ...]
KernelInit = Callable[..., Initializer]  # (in_axis, out_axis) -> initializer.


def partitioned(init: Initializer, *names: str | None) -> Initializer:
  """Attach logical axis names (one per dimension) to an initialiser."""
  return nnx.with_partitioning(init, names)


# torch.nn.init.xavier_uniform_ on a Linear/Conv weight viewed as (out, in):
# fan_in and fan_out are the input and output sizes, whatever the kernel rank.
def xavier_uniform(in_axis: Axes = -2, out_axis: Axes = -1) -> Initializer:
  """Xavier-uniform initialiser with explicit fan-in / fan-out axes."""
  return jax.nn.initializers.variance_scaling(
      1.0, 'fan_avg', 'uniform', in_axis=in_axis, out_axis=out_axis)


def torch_trunc_normal(std: float = 0.02) -> Initializer:
  """torch.nn.init.trunc_normal_(std=std) as DINO and timm call it.

  torch truncates at a = -2, b = 2 in absolute units, i.e. at +-100 std for
  std 0.02: in effect a plain normal. jax's default cuts at +-2 std (and the
  std shrinks to 0.88 std), so the bounds are given explicitly.
  """
  return jax.nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


def torch_default_uniform(fan_in: int) -> Initializer:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default init of Linear and Conv weights and biases.

  torch/nn/modules/conv.py `_ConvNd.reset_parameters` (and linear.py alike):
  kaiming_uniform_(weight, a=sqrt(5)) has bound gain * sqrt(3 / fan_in) with
  gain = sqrt(2 / (1 + 5)), i.e. 1 / sqrt(fan_in); the bias is uniform with
  the same bound. fan_in = in_channels * kernel area.
  """
  bound = fan_in ** -0.5

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def fan_free(init: Initializer) -> KernelInit:
  """A `KernelInit` for an initialiser that ignores fans (normal, truncated normal)."""
  def kernel_init(in_axis: Axes = -2, out_axis: Axes = -1) -> Initializer:
    del in_axis, out_axis
    return init
  return kernel_init


def normal(std: float) -> KernelInit:
  """N(0, std^2) kernels: GPT-2 and BERT (Hugging Face `_init_weights`, std 0.02)."""
  return fan_free(nnx.initializers.normal(std))


INITS = ('mae', 'dino')


def linear_init(init: str) -> KernelInit:
  """The kernel initialiser of the ViT's linears under recipe `init`.

  'mae': xavier-uniform (MAE's models_mae.py `_init_weights`). 'dino':
  trunc_normal_(std=.02) (facebookresearch/dino vision_transformer.py,
  `VisionTransformer._init_weights`, lines 165-169); biases are 0 in both.
  """
  if init == 'mae':
    return xavier_uniform
  if init == 'dino':
    return fan_free(torch_trunc_normal(0.02))
  raise ConfigError(f'ViT init={init!r}: expected one of {INITS}')
