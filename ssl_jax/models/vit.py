"""Vision Transformer (Dosovitskiy et al. 2021) in Flax NNX, as MAE and DINO use it.

Layout and initialisation follow the MAE reference code (timm `Block`, fused
qkv with bias, pre-LayerNorm with eps 1e-6, exact GELU, xavier-uniform
linears, 2-D sin-cos position embeddings), so weights map one-to-one onto
PyTorch MAE checkpoints. DINO's parts are options: its learned position
embedding, interpolated for small crops (`posemb='learned'`), its
initialisation (`init='dino'`) and stochastic depth (`drop_path_rate`,
applied only when a call passes a `drop_path_key`). Every parameter carries
logical axis names (`embed`, `mlp`, `heads`, `kv`) that `ssl_jax.sharding`
maps onto the mesh.
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


def torch_trunc_normal(std: float = 0.02):
  """torch.nn.init.trunc_normal_(std=std) as DINO and timm call it.

  torch truncates at a = -2, b = 2 in absolute units, i.e. at +-100 std for
  std 0.02: in effect a plain normal. jax's default cuts at +-2 std (and the
  std shrinks to 0.88 std), so the bounds are given explicitly.
  """
  return jax.nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


def torch_default_uniform(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default init of Linear and Conv weights and biases.

  torch/nn/modules/conv.py `_ConvNd.reset_parameters` (and linear.py alike):
  kaiming_uniform_(weight, a=sqrt(5)) has bound gain * sqrt(3 / fan_in) with
  gain = sqrt(2 / (1 + 5)), i.e. 1 / sqrt(fan_in); the bias is uniform with
  the same bound. fan_in = in_channels * kernel area.
  """
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


INITS = ('mae', 'dino')


def linear_init(init: str, in_axis=-2, out_axis=-1):
  """The kernel initialiser of the transformer's linears under recipe `init`.

  'mae': xavier-uniform (MAE's models_mae.py `_init_weights`). 'dino':
  trunc_normal_(std=.02) (facebookresearch/dino vision_transformer.py,
  `VisionTransformer._init_weights`, lines 165-169); biases are 0 in both.
  """
  if init == 'mae':
    return xavier_uniform(in_axis, out_axis)
  if init == 'dino':
    return torch_trunc_normal(0.02)
  raise ConfigError(f'ViT init={init!r}: expected one of {INITS}')


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Stochastic depth on a residual branch (B, ...): timm / DINO's `drop_path`.

  facebookresearch/dino vision_transformer.py lines 27-35: each example's
  branch is zeroed with probability `rate` and kept ones are scaled by
  1 / (1 - rate), so the expectation is unchanged. No key (or rate 0): the
  identity, as `drop_path(..., training=False)`. The mask has one entry per
  row of `x` drawn from `key` for the whole (global) batch, so it does not
  depend on how the batch is sharded.
  """
  if key is None or rate == 0.0:
    return x
  keep_prob = 1.0 - rate
  keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * (keep / keep_prob).astype(x.dtype)


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


def bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
  """(out_size, in_size) weights of torch's bicubic resampling with scale factor `scale`.

  torch.nn.functional.interpolate(mode='bicubic', align_corners=False) with
  an explicit `scale_factor`: output pixel i reads source position
  (i + 0.5) / scale - 0.5 with Keys' cubic kernel, a = -0.75, and indices
  clamped to the border (torch's upsample_bicubic2d); no antialiasing.
  """
  a = -0.75

  def kernel(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))

  matrix = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    source = (i + 0.5) / scale - 0.5
    first = int(np.floor(source))
    for tap in range(first - 1, first + 3):
      matrix[i, min(max(tap, 0), in_size - 1)] += kernel(source - tap)
  return matrix


def interpolate_posemb(posemb: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
  """(1, 1+N, D) learned [CLS]+square-grid positions -> (1, 1+grid_h*grid_w, D).

  DINO's `VisionTransformer.interpolate_pos_encoding` (vision_transformer.py):
  the patch positions, a sqrt(N) x sqrt(N) grid, are resampled bicubically
  to the crop's grid with scale factor (grid + 0.1) / sqrt(N) (the +0.1 is
  DINO's guard against flooring, see facebookresearch/dino issue 8; it also
  sets torch's sampling positions, so we use it too), and the [CLS]
  position is kept. The same grid returns `posemb` itself.
  """
  num_patches = posemb.shape[1] - 1
  side = int(round(num_patches ** 0.5))
  if side * side != num_patches:
    raise ValueError(f'interpolate_posemb: {num_patches} patch positions are not a square grid')
  if (grid_h, grid_w) == (side, side):
    return posemb
  rows = bicubic_matrix(side, grid_h, (grid_h + 0.1) / side)  # (grid_h, side)
  cols = bicubic_matrix(side, grid_w, (grid_w + 0.1) / side)  # (grid_w, side)
  patches = posemb[0, 1:].astype(jnp.float32).reshape(side, side, -1)
  resized = jnp.einsum('ih,jw,hwd->ijd', jnp.asarray(rows, jnp.float32),
                       jnp.asarray(cols, jnp.float32), patches,
                       precision=jax.lax.Precision.HIGHEST)  # (grid_h, grid_w, D)
  resized = resized.reshape(1, grid_h * grid_w, -1).astype(posemb.dtype)
  return jnp.concatenate([posemb[:, :1], resized], axis=1)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection."""

  def __init__(self, width: int, num_heads: int, *, dtype: Dtype, init: str = 'mae',
               rngs: nnx.Rngs):
    if width % num_heads:
      raise ConfigError(f'width {width} is not divisible by num_heads {num_heads}')
    head_dim = width // num_heads
    self.qkv = nnx.Einsum(
        'btd,dkhe->btkhe', (width, 3, num_heads, head_dim), (3, num_heads, head_dim),
        kernel_init=partitioned(linear_init(init, 0, (1, 2, 3)), 'embed', None, 'heads', 'kv'),
        bias_init=partitioned(nnx.initializers.zeros, None, 'heads', 'kv'),
        dtype=dtype, rngs=rngs)
    self.proj = nnx.Einsum(
        'bthe,hed->btd', (num_heads, head_dim, width), (width,),
        kernel_init=partitioned(linear_init(init, (0, 1), 2), 'heads', 'kv', 'embed'),
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

  def __init__(self, width: int, mlp_dim: int, *, dtype: Dtype, init: str = 'mae',
               rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(
        width, mlp_dim, dtype=dtype, rngs=rngs,
        kernel_init=partitioned(linear_init(init), 'embed', 'mlp'),
        bias_init=partitioned(nnx.initializers.zeros, 'mlp'))
    self.fc2 = nnx.Linear(
        mlp_dim, width, dtype=dtype, rngs=rngs,
        kernel_init=partitioned(linear_init(init), 'mlp', 'embed'),
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
  """Pre-LN transformer block: x + attn(norm(x)), then x + mlp(norm(x)).

  With a `drop_path_key`, each residual branch is dropped per example with
  probability `drop_path_rate` (stochastic depth; DINO's Block.forward,
  vision_transformer.py lines 107-113, one DropPath draw per branch).
  """

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dtype: Dtype,
               init: str = 'mae', drop_path_rate: float = 0.0, rngs: nnx.Rngs):
    self.norm1 = layer_norm(width, dtype=dtype, rngs=rngs)
    self.attn = Attention(width, num_heads, dtype=dtype, init=init, rngs=rngs)
    self.norm2 = layer_norm(width, dtype=dtype, rngs=rngs)
    self.mlp = MlpBlock(width, mlp_dim, dtype=dtype, init=init, rngs=rngs)
    self.drop_path_rate = float(drop_path_rate)  # Static: part of the graph, not the state.

  def __call__(self, x: jax.Array,
               drop_path_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(B, T, D) -> ((B, T, D), attention weights); no key: deterministic."""
    attn_key = mlp_key = None
    if drop_path_key is not None:
      attn_key, mlp_key = jax.random.split(drop_path_key)
    attended, weights = self.attn(self.norm1(x))
    x = x + drop_path(attended, self.drop_path_rate, attn_key)
    return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, mlp_key), weights


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
  """Block i's rate: linear from 0 at the first block to `drop_path_rate` at the last.

  DINO's stochastic depth decay rule, vision_transformer.py line 150:
  `torch.linspace(0, drop_path_rate, depth)`.
  """
  return [float(rate) for rate in np.linspace(0.0, drop_path_rate, depth)]


class Transformer(nnx.Module):
  """A stack of pre-LN blocks followed by a final LayerNorm."""

  def __init__(self, width: int, depth: int, num_heads: int, mlp_dim: int, *,
               dtype: Dtype, remat: bool = False, init: str = 'mae',
               drop_path_rate: float = 0.0, rngs: nnx.Rngs):
    self.blocks = nnx.List([
        Block(width, num_heads, mlp_dim, dtype=dtype, init=init, drop_path_rate=rate, rngs=rngs)
        for rate in drop_path_rates(drop_path_rate, depth)])
    self.norm = layer_norm(width, dtype=dtype, rngs=rngs)
    self.remat = remat

  def __call__(self, x: jax.Array,
               drop_path_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(B, T, D) -> (normed output (B, T, D), last block's attention weights).

    `drop_path_key` (train mode) gives block i the key fold_in(key, i); None
    (eval, features, the teacher) runs every block whole.
    """
    weights = None
    for i, block in enumerate(self.blocks):
      key = None if drop_path_key is None else jax.random.fold_in(drop_path_key, i)
      if self.remat:  # Recompute activations in the backward pass to save memory.
        x, weights = nnx.remat(lambda blk, h, k: blk(h, k))(block, x, key)
      else:
        x, weights = block(x, key)
    return self.norm(x), weights


class ViT(nnx.Module):
  """ViT encoder: conv patch embedding, [CLS] token, position embeddings.

  `posemb='sincos'` (MAE): fixed 2-D sin-cos positions for any grid, none on
  [CLS]. `posemb='learned'` (DINO, timm): a (1, 1+L, D) parameter for the
  [CLS] token and the patch grid of `image_size`, trunc-normal(0.02) at init
  and bicubically interpolated for other crop sizes (DINO's local crops).

  `init='mae'` (MAE's models_mae.py `initialize_weights`): xavier-uniform
  linears and patch projection (as a Linear on the flattened patch),
  [CLS] normal(0.02). `init='dino'` (facebookresearch/dino
  vision_transformer.py `VisionTransformer.__init__` lines 161-163 and
  `_init_weights` lines 165-172): linears trunc_normal_(std=.02), [CLS] and
  pos_embed trunc_normal_(std=.02); `_init_weights` touches only Linear and
  LayerNorm, so the patch-embedding Conv2d keeps torch's default,
  U(+-1/sqrt(C*p*p)) for its weight and its bias (`torch_default_uniform`).
  Biases 0 and LayerNorm 1/0 in both.

  `drop_path_rate`: stochastic depth rising linearly over the blocks
  (`drop_path_rates`), used only by calls that pass a `drop_path_key`.
  """

  def __init__(self, *, patch_size: int, channels: int, width: int, depth: int,
               num_heads: int, mlp_dim: int, dtype: Dtype = jnp.float32,
               remat: bool = False, posemb: str = 'sincos', image_size: int | None = None,
               init: str = 'mae', drop_path_rate: float = 0.0, rngs: nnx.Rngs):
    if init not in INITS:
      raise ConfigError(f'ViT init={init!r}: expected one of {INITS}')
    if not 0.0 <= drop_path_rate < 1.0:
      raise ConfigError(f'drop_path_rate={drop_path_rate} must be in [0, 1)')
    if posemb not in ('sincos', 'learned'):
      raise ConfigError(f"ViT posemb={posemb!r}: expected 'sincos' or 'learned'")
    if posemb == 'learned' and (image_size is None or image_size % patch_size):
      raise ConfigError(f'A learned position embedding needs an image_size divisible by the '
                        f'patch size {patch_size}, got {image_size}')
    self.patch_size = patch_size
    self.width = width
    self.dtype = dtype
    self.posemb = posemb
    # Conv with kernel = stride = patch. MAE inits it as a Linear on the
    # flattened (p*p*C) patch, hence the explicit fan axes; DINO leaves it to torch.
    if init == 'mae':
      patch_kernel_init = xavier_uniform((0, 1, 2), 3)
      patch_bias_init = nnx.initializers.zeros
      cls_init = nnx.initializers.normal(0.02)
    else:
      patch_kernel_init = patch_bias_init = torch_default_uniform(channels * patch_size**2)
      cls_init = torch_trunc_normal(0.02)
    self.patch_embed = nnx.Conv(
        channels, width, (patch_size, patch_size), strides=patch_size,
        padding='VALID', dtype=dtype, rngs=rngs,
        kernel_init=partitioned(patch_kernel_init, None, None, None, 'embed'),
        bias_init=partitioned(patch_bias_init, 'embed'))
    self.cls_token = nnx.Param(
        partitioned(cls_init, None, None, 'embed')(rngs.params(), (1, 1, width)))
    if posemb == 'learned':
      num_patches = (image_size // patch_size) ** 2
      self.pos_embed = nnx.Param(
          partitioned(torch_trunc_normal(0.02), None, None, 'embed')(
              rngs.params(), (1, 1 + num_patches, width)))
    self.encoder = Transformer(width, depth, num_heads, mlp_dim, dtype=dtype, remat=remat,
                               init=init, drop_path_rate=drop_path_rate, rngs=rngs)

  def patch_tokens(self, images: jax.Array) -> jax.Array:
    """(B, H, W, C) float images -> (B, L, D) patch embeddings + positions."""
    x = self.patch_embed(images.astype(self.dtype))  # (B, h, w, D)
    batch, grid_h, grid_w, width = x.shape
    if self.posemb == 'learned':
      pos = interpolate_posemb(self.pos_embed[...], grid_h, grid_w)[0, 1:]  # (L, D)
    else:
      pos = posemb_sincos_2d(grid_h, grid_w, width)
    return x.reshape(batch, grid_h * grid_w, width) + jnp.asarray(pos, x.dtype)

  def encode(self, tokens: jax.Array,
             drop_path_key: jax.Array | None = None) -> dict[str, jax.Array]:
    """Prepend [CLS] (plus its learned position, if any; sin-cos: none) and run the blocks.

    Returns a dict of intermediates (big_vision style) so probes and
    visualisations need no hooks: `tokens` (B, 1+L, D) after the final norm,
    `cls` (B, D), `patch_mean` (B, D) the mean of the patch tokens, and
    `attention` (B, heads, 1+L, 1+L) of the last block. Paths are dropped
    only with a `drop_path_key` (training the student); without it the
    output is deterministic.
    """
    cls = self.cls_token[...]
    if self.posemb == 'learned':
      cls = cls + self.pos_embed[:, :1]
    cls = jnp.broadcast_to(cls.astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
    x = jnp.concatenate([cls, tokens], axis=1)
    x, attention = self.encoder(x, drop_path_key)
    return {'tokens': x, 'cls': x[:, 0], 'patch_mean': x[:, 1:].mean(axis=1),
            'attention': attention}

  def __call__(self, images: jax.Array,
               drop_path_key: jax.Array | None = None) -> dict[str, jax.Array]:
    """(B, H, W, C) float images -> intermediates of `encode`."""
    return self.encode(self.patch_tokens(images), drop_path_key)
