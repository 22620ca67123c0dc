"""Vision Transformer (Dosovitskiy et al. 2021) in Flax NNX, as MAE and DINO use it.

The blocks are the shared transformer core's (`ssl_jax.models.transformer`:
`Transformer`, `Block`, `Attention`); this file adds the patch embedding,
the [CLS] token and the position embeddings. Layout and initialisation
follow the MAE reference code (timm `Block`, fused qkv with bias,
pre-LayerNorm with eps 1e-6, exact GELU, xavier-uniform linears, 2-D sin-cos
position embeddings), so weights map one-to-one onto PyTorch MAE
checkpoints. DINO's parts are options: its learned position embedding,
interpolated for small crops (`posemb='learned'`), its initialisation
(`init='dino'`) and stochastic depth (`drop_path_rate`, applied only when a
call passes a `drop_path_key`). Every parameter carries logical axis names
(`embed`, `mlp`, `heads`, `kv`) that `ssl_jax.sharding` maps onto the mesh.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssl_jax.errors import ConfigError
from ssl_jax.models.initializers import (
  INITS,
  linear_init,
  partitioned,
  torch_default_uniform,
  torch_trunc_normal,
  xavier_uniform,
)
from ssl_jax.models.transformer import Transformer

Dtype = Any


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
  (`regularizers.drop_path_rates`), used only by calls that pass a `drop_path_key`.
  """

  def __init__(self, *, patch_size: int, channels: int, width: int, depth: int,
               num_heads: int, mlp_dim: int, dtype: Dtype = jnp.float32,
               remat: Any = False, posemb: str = 'sincos', image_size: int | None = None,
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
                               kernel_init=linear_init(init), drop_path_rate=drop_path_rate,
                               rngs=rngs)

  def patch_tokens(self, images: jax.Array) -> jax.Array:
    """(B, H, W, C) float images -> (B, L, D) patch embeddings + positions."""
    x = self.patch_embed(images.astype(self.dtype))  # (B, h, w, D)
    batch, grid_h, grid_w, width = x.shape
    if self.posemb == 'learned':
      pos = interpolate_posemb(self.pos_embed[...], grid_h, grid_w)[0, 1:]  # (L, D)
    else:
      pos = posemb_sincos_2d(grid_h, grid_w, width)
    return x.reshape(batch, grid_h * grid_w, width) + jnp.asarray(pos, x.dtype)

  def encode(self, tokens: jax.Array, drop_path_key: jax.Array | None = None,
             final_norm: bool = True) -> dict[str, jax.Array]:
    """Prepend [CLS] (plus its learned position, if any; sin-cos: none) and run the blocks.

    Returns a dict of intermediates (big_vision style) so probes and
    visualisations need no hooks: `tokens` (B, 1+L, D) after the final norm,
    `cls` (B, D), `patch_mean` (B, D) the mean of the patch tokens, and
    `attention` (B, heads, 1+L, 1+L) of the last block. Paths are dropped
    only with a `drop_path_key` (training the student); without it the
    output is deterministic. `final_norm=False` leaves out the encoder's last
    LayerNorm (MAE models_vit.py L46-48: the global pool of fine-tuning).
    """
    cls = self.cls_token[...]
    if self.posemb == 'learned':
      cls = cls + self.pos_embed[:, :1]
    cls = jnp.broadcast_to(cls.astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
    x = jnp.concatenate([cls, tokens], axis=1)
    x, attention = self.encoder(x, drop_path_key, final_norm)
    return {'tokens': x, 'cls': x[:, 0], 'patch_mean': x[:, 1:].mean(axis=1),
            'attention': attention}

  def __call__(self, images: jax.Array, drop_path_key: jax.Array | None = None,
               final_norm: bool = True) -> dict[str, jax.Array]:
    """(B, H, W, C) float images -> intermediates of `encode`."""
    return self.encode(self.patch_tokens(images), drop_path_key, final_norm)
