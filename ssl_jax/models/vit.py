"""Vision Transformer (Dosovitskiy et al. 2021) in Flax NNX, as MAE and DINO use it.

Layout and initialisation follow the MAE reference code (timm `Block`, fused
qkv with bias, pre-LayerNorm with eps 1e-6, exact GELU, xavier-uniform
linears, 2-D sin-cos position embeddings), so weights map one-to-one onto
PyTorch MAE checkpoints. Every parameter carries logical axis names
(`embed`, `mlp`, `heads`, `kv`) that `ssl_jax.sharding` maps onto the mesh.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssl_jax.errors import ConfigError

Dtype = Any

# torch.nn.init.xavier_uniform_ on a Linear/Conv weight viewed as (out, in):
# fan_in and fan_out are the input and output sizes, whatever the kernel rank.
def xavier_uniform(in_axis=-2, out_axis=-1):
  """Xavier-uniform initialiser with explicit fan-in / fan-out axes."""
  return jax.nn.initializers.variance_scaling(
      1.0, 'fan_avg', 'uniform', in_axis=in_axis, out_axis=out_axis)


def partitioned(init, *names):
  """Attach logical axis names (one per dimension) to an initialiser."""
  return nnx.with_partitioning(init, names)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """(M,) positions -> (M, dim) [sin | cos] embedding, as in MAE's pos_embed.py."""
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  angles = np.einsum('m,d->md', positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def posemb_sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding (grid_h*grid_w, dim), row-major.

  Mirrors `get_2d_sincos_pos_embed` of the MAE code: the first half of the
  channels encodes the column coordinate, the second half the row.
  """
  if dim % 4:
    raise ConfigError(f'sin-cos position embedding needs width % 4 == 0, got {dim}')
  cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32),
                           np.arange(grid_h, dtype=np.float32))
  emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  return emb.astype(np.float32)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection."""

  def __init__(self, width: int, num_heads: int, *, dtype: Dtype, rngs: nnx.Rngs):
    if width % num_heads:
      raise ConfigError(f'width {width} is not divisible by num_heads {num_heads}')
    head_dim = width // num_heads
    self.qkv = nnx.Einsum(
        'btd,dkhe->btkhe', (width, 3, num_heads, head_dim), (3, num_heads, head_dim),
        kernel_init=partitioned(xavier_uniform(0, (1, 2, 3)), 'embed', None, 'heads', 'kv'),
        bias_init=partitioned(nnx.initializers.zeros, None, 'heads', 'kv'),
        dtype=dtype, rngs=rngs)
    self.proj = nnx.Einsum(
        'bthe,hed->btd', (num_heads, head_dim, width), (width,),
        kernel_init=partitioned(xavier_uniform((0, 1), 2), 'heads', 'kv', 'embed'),
        bias_init=partitioned(nnx.initializers.zeros, 'embed'),
        dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, T, D) -> ((B, T, D), attention weights (B, heads, T, T))."""
    qkv = self.qkv(x)  # (B, T, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = q * (q.shape[-1] ** -0.5)
    logits = jnp.einsum('bqhe,bkhe->bhqk', q, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhe->bqhe', weights, v)
    return self.proj(out), weights


class MlpBlock(nnx.Module):
  """Transformer feed-forward block: Linear -> GELU (erf) -> Linear."""

  def __init__(self, width: int, mlp_dim: int, *, dtype: Dtype, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(
        width, mlp_dim, dtype=dtype, rngs=rngs,
        kernel_init=partitioned(xavier_uniform(), 'embed', 'mlp'),
        bias_init=partitioned(nnx.initializers.zeros, 'mlp'))
    self.fc2 = nnx.Linear(
        mlp_dim, width, dtype=dtype, rngs=rngs,
        kernel_init=partitioned(xavier_uniform(), 'mlp', 'embed'),
        bias_init=partitioned(nnx.initializers.zeros, 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, T, D)."""
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def layer_norm(width: int, *, dtype: Dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm with eps 1e-6 (MAE, DINO, ViT) and sharded scale/bias."""
  return nnx.LayerNorm(
      width, epsilon=1e-6, dtype=dtype, rngs=rngs,
      scale_init=partitioned(nnx.initializers.ones, 'embed'),
      bias_init=partitioned(nnx.initializers.zeros, 'embed'))


class Block(nnx.Module):
  """Pre-LN transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dtype: Dtype,
               rngs: nnx.Rngs):
    self.norm1 = layer_norm(width, dtype=dtype, rngs=rngs)
    self.attn = Attention(width, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = layer_norm(width, dtype=dtype, rngs=rngs)
    self.mlp = MlpBlock(width, mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, T, D) -> ((B, T, D), attention weights)."""
    attended, weights = self.attn(self.norm1(x))
    x = x + attended
    return x + self.mlp(self.norm2(x)), weights


class Transformer(nnx.Module):
  """A stack of pre-LN blocks followed by a final LayerNorm."""

  def __init__(self, width: int, depth: int, num_heads: int, mlp_dim: int, *,
               dtype: Dtype, remat: bool = False, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(width, num_heads, mlp_dim, dtype=dtype, rngs=rngs)
                            for _ in range(depth)])
    self.norm = layer_norm(width, dtype=dtype, rngs=rngs)
    self.remat = remat

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, T, D) -> (normed output (B, T, D), last block's attention weights)."""
    weights = None
    for block in self.blocks:
      if self.remat:  # Recompute activations in the backward pass to save memory.
        x, weights = nnx.remat(lambda blk, h: blk(h))(block, x)
      else:
        x, weights = block(x)
    return self.norm(x), weights


class ViT(nnx.Module):
  """ViT encoder: conv patch embedding, [CLS] token, fixed sin-cos positions."""

  def __init__(self, *, patch_size: int, channels: int, width: int, depth: int,
               num_heads: int, mlp_dim: int, dtype: Dtype = jnp.float32,
               remat: bool = False, rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.width = width
    self.dtype = dtype
    # Conv with kernel = stride = patch; MAE inits it as a Linear on the
    # flattened (p*p*C) patch, hence the explicit fan axes.
    self.patch_embed = nnx.Conv(
        channels, width, (patch_size, patch_size), strides=patch_size,
        padding='VALID', dtype=dtype, rngs=rngs,
        kernel_init=partitioned(xavier_uniform((0, 1, 2), 3), None, None, None, 'embed'),
        bias_init=partitioned(nnx.initializers.zeros, 'embed'))
    self.cls_token = nnx.Param(
        partitioned(nnx.initializers.normal(0.02), None, None, 'embed')(
            rngs.params(), (1, 1, width)))
    self.encoder = Transformer(width, depth, num_heads, mlp_dim, dtype=dtype,
                               remat=remat, rngs=rngs)

  def patch_tokens(self, images: jax.Array) -> jax.Array:
    """(B, H, W, C) float images -> (B, L, D) patch embeddings + positions."""
    x = self.patch_embed(images.astype(self.dtype))  # (B, h, w, D)
    batch, grid_h, grid_w, width = x.shape
    pos = posemb_sincos_2d(grid_h, grid_w, width)
    return x.reshape(batch, grid_h * grid_w, width) + jnp.asarray(pos, x.dtype)

  def encode(self, tokens: jax.Array) -> dict[str, jax.Array]:
    """Prepend [CLS] (position 0 embedding is zero) and run the blocks.

    Returns a dict of intermediates (big_vision style) so probes and
    visualisations need no hooks: `tokens` (B, 1+L, D) after the final norm,
    `cls` (B, D), `patch_mean` (B, D) the mean of the patch tokens, and
    `attention` (B, heads, 1+L, 1+L) of the last block.
    """
    cls = jnp.broadcast_to(self.cls_token[...].astype(tokens.dtype),
                           (tokens.shape[0], 1, tokens.shape[-1]))
    x = jnp.concatenate([cls, tokens], axis=1)
    x, attention = self.encoder(x)
    return {'tokens': x, 'cls': x[:, 0], 'patch_mean': x[:, 1:].mean(axis=1),
            'attention': attention}

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """(B, H, W, C) float images -> intermediates of `encode`."""
    return self.encode(self.patch_tokens(images))
