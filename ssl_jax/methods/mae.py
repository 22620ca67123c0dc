"""Masked Autoencoders (He et al. 2021): reconstruct masked patches from visible ones.

The encoder (a ViT) sees only a random 25% of the patches; a light
transformer decoder receives the encoded visible patches plus a shared mask
token at every removed position, and predicts the pixels of the removed
patches. Masking is per sample, by argsort of uniform noise, as in the
reference code (github.com/facebookresearch/mae, models_mae.py).
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssl_jax import flops, losses
from ssl_jax.data.normalize import denormalize, normalize
from ssl_jax.methods.base import Batch, Method, Metrics
from ssl_jax.models.initializers import partitioned, xavier_uniform
from ssl_jax.models.transformer import Transformer, over_rows
from ssl_jax.models.vit import ViT, posemb_sincos_2d
from ssl_jax.pictures import image_grid


def random_masking(tokens: jax.Array, rng: jax.Array | None, mask_ratio: float,
                   noise: jax.Array | None = None):
  """Keeps a random (1 - mask_ratio) share of each sample's tokens.

  Args:
    tokens: (B, L, D) patch tokens.
    rng: PRNG key (unused when `noise` is given).
    mask_ratio: fraction of tokens removed.
    noise: optional (B, L) noise that decides the masking, as the `noise`
      argument of Hugging Face's ViTMAEEmbeddings.random_masking
      (modeling_vit_mae.py); by default uniform noise drawn from `rng`.

  Returns:
    kept (B, K, D) tokens in shuffled order, mask (B, L) with 1 = removed,
    and ids_restore (B, L), the permutation that unshuffles.
  """
  batch, length, _ = tokens.shape
  num_keep = int(length * (1 - mask_ratio))
  if noise is None:
    noise = jax.random.uniform(rng, (batch, length))
  ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: the smallest noise is kept
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  kept = jnp.take_along_axis(tokens, ids_shuffle[:, :num_keep, None], axis=1)
  mask = jnp.ones((batch, length), jnp.float32).at[:, :num_keep].set(0.0)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return kept, mask, ids_restore


class MAEModel(nnx.Module):
  """ViT encoder plus the MAE decoder (decoder_embed, mask token, blocks, pred)."""

  def __init__(self, encoder: ViT, *, channels: int, decoder_width: int,
               decoder_depth: int, decoder_heads: int, decoder_mlp_dim: int,
               dtype, remat: Any, rngs: nnx.Rngs):
    self.encoder = encoder
    patch = encoder.patch_size
    self.decoder_embed = nnx.Linear(
        encoder.width, decoder_width, dtype=dtype, rngs=rngs,
        kernel_init=partitioned(xavier_uniform(), 'embed', None),
        bias_init=partitioned(nnx.initializers.zeros, None))
    self.mask_token = nnx.Param(
        partitioned(nnx.initializers.normal(0.02), None, None, 'embed')(
            rngs.params(), (1, 1, decoder_width)))
    self.decoder = Transformer(decoder_width, decoder_depth, decoder_heads,
                               decoder_mlp_dim, dtype=dtype, remat=remat, rngs=rngs)
    self.decoder_pred = nnx.Linear(
        decoder_width, patch * patch * channels, dtype=dtype, rngs=rngs,
        kernel_init=partitioned(xavier_uniform(), 'embed', None),
        bias_init=partitioned(nnx.initializers.zeros, None))

  def decode(self, latent: jax.Array, ids_restore: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """(B, 1+K, D) encoded [CLS]+visible tokens -> (B, L, p*p*C) patch pixels."""
    x = over_rows(self.decoder_embed, latent)
    batch, length = ids_restore.shape
    num_masked = length - (x.shape[1] - 1)
    mask_tokens = jnp.broadcast_to(self.mask_token[...].astype(x.dtype),
                                   (batch, num_masked, x.shape[-1]))
    patches = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)  # (B, L, Dd), shuffled
    patches = jnp.take_along_axis(patches, ids_restore[:, :, None], axis=1)  # unshuffle
    pos = posemb_sincos_2d(*grid, x.shape[-1])
    x = jnp.concatenate([x[:, :1], patches + jnp.asarray(pos, x.dtype)], axis=1)
    x, _ = self.decoder(x)
    return over_rows(self.decoder_pred, x[:, 1:]).astype(jnp.float32)

  def __call__(self, images: jax.Array, rng: jax.Array | None, mask_ratio: float,
               noise: jax.Array | None = None):
    """Normalised (B, H, W, C) images -> (pred (B, L, p*p*C), mask (B, L)).

    The (B, L) `noise`, if given, decides the masking instead of `rng`.
    """
    tokens = self.encoder.patch_tokens(images)
    patch = self.encoder.patch_size
    grid = (images.shape[1] // patch, images.shape[2] // patch)
    kept, mask, ids_restore = random_masking(tokens, rng, mask_ratio, noise)
    latent = self.encoder.encode(kept)['tokens']
    return self.decode(latent, ids_restore, grid), mask


class MAE(Method):
  """The MAE method: model, loss, export and reconstruction pictures."""

  capabilities = frozenset({'features', 'pictures'})

  picture_name = 'reconstructions'

  def _vit(self, rngs: nnx.Rngs) -> ViT:
    m = self.config.model
    return ViT(patch_size=m.patch_size, channels=self.config.data.channels,
               width=m.width, depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
               dtype=jnp.dtype(m.dtype), remat=m.remat, rngs=rngs)

  def build(self, rngs: nnx.Rngs) -> MAEModel:
    """ViT encoder + MAE decoder, as configured in `config.model`."""
    m = self.config.model
    return MAEModel(self._vit(rngs), channels=self.config.data.channels,
                    decoder_width=m.decoder_width, decoder_depth=m.decoder_depth,
                    decoder_heads=m.decoder_heads, decoder_mlp_dim=m.decoder_mlp_dim,
                    dtype=jnp.dtype(m.dtype), remat=m.remat, rngs=rngs)

  def _normalize(self, images: jax.Array) -> jax.Array:
    return normalize(images, self.config.data.mean, self.config.data.std)

  def loss_fn(self, model: MAEModel, batch: Batch, rng: jax.Array,
              step: jax.Array) -> tuple[jax.Array, Metrics]:
    """Reconstruction loss on the masked patches of normalised images."""
    del step
    images = self._normalize(batch['image'])
    pred, mask = model(images, rng, self.config.model.mask_ratio)
    target = losses.patchify(images, self.config.model.patch_size)
    loss = losses.mae_loss(pred, target, mask, self.config.model.norm_pix_loss)
    return loss, {'mask_fraction': mask.mean()}

  def train_flops_per_example(self) -> float:
    """Model FLOPs of one image's step, for MFU (`ssl_jax.flops.mae_train_flops`)."""
    return flops.mae_train_flops(self.config)

  def encoder(self, model: MAEModel) -> ViT:
    """The ViT encoder, without the decoder."""
    return model.encoder

  def build_encoder(self, rngs: nnx.Rngs) -> ViT:
    """A freshly initialised ViT of the configured shape."""
    return self._vit(rngs)

  def features(self, encoder: ViT, images: jax.Array) -> jax.Array:
    """uint8 images -> the ViT's `config.eval.pool` output ('cls' or 'patch_mean')."""
    return encoder(self._normalize(images))[self.config.eval.pool].astype(jnp.float32)

  def visualize(self, model: MAEModel, batch: Batch, rng: jax.Array):
    """Originals, their masks and the reconstructions of the first 8 images."""
    images = self._normalize(batch['image'][:8])
    pred, mask = model(images, rng, self.config.model.mask_ratio)
    return {'images': images, 'pred': pred, 'mask': mask}

  def render(self, arrays) -> np.ndarray:
    """Three rows: originals, masked inputs, reconstructions (+ visible patches)."""
    images, pred, mask = (np.asarray(arrays[k], np.float32) for k in ('images', 'pred', 'mask'))
    patch = self.config.model.patch_size
    _, height, width, _ = images.shape
    target = np.asarray(losses.patchify(images, patch))
    if self.config.model.norm_pix_loss:  # Predictions are in per-patch normalised units.
      mean = target.mean(-1, keepdims=True)
      std = np.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
      pred = pred * std + mean
    mask = mask[..., None]
    masked = np.asarray(losses.unpatchify(target * (1 - mask), patch, height, width))
    recon = np.asarray(losses.unpatchify(pred * mask + target * (1 - mask), patch, height, width))
    mean, std = self.config.data.mean, self.config.data.std
    return image_grid(np.stack([denormalize(x, mean, std) for x in (images, masked, recon)]))

