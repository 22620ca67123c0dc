"""On-device crops: random resized crop, flip and whole views, as a library.

The trainers cut SimCLR's and DINO's crops on the HOST (`pipeline.ViewSpec`,
`augment.random_resized_crop_box`) and only colour them on device
(`device_augment`). These ops crop images that are already resident on the
device, inside a jitted function: a float32 (H, W, C) image in [0, 1] and
its own PRNG key in, no Python control flow on traced values, so a view is
`vmap`ped over a batch with one key per example (`device_augment.augment_batch`).
Boxes follow torchvision's RandomResizedCrop; resizing follows Pillow's
antialiased kernels.
"""

import math

import jax
import jax.numpy as jnp

from ssl_jax.data.device_augment import bernoulli, photometric, simclr_colour

# `interpolation` -> jax.image method. Both are the kernels Pillow uses
# (triangle; Keys cubic with a = -0.5), antialiased when shrinking.
_METHODS = {'bilinear': 'linear', 'bicubic': 'cubic'}


# ------------------------------------------------------------------ geometry ---


def random_resized_crop_box(key: jax.Array, height: int, width: int,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
  """Samples an int32 box (top, left, h, w) with torchvision's distribution."""
  # torchvision RandomResizedCrop.get_params (mirrored on the host by
  # augment.random_resized_crop_box): up to ten tries of an area fraction
  # ~ U(scale) and a log-uniform aspect ratio; the first rounded box that fits
  # wins. Here all ten are drawn at once and the first fit is picked, which
  # has the same distribution. SimCLR's TF code instead uses
  # tf.image.sample_distorted_bounding_box (100 tries, whole image fallback).
  # One draw of 22 uniforms rather than one per quantity: each random call is
  # a separate threefry program, and they dominate the compile time.
  tries = 10
  u = jax.random.uniform(key, (2 * tries + 2,))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:tries])  # (tries,)
  log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[tries:2 * tries]
  aspect = jnp.exp(log_ratio)  # (tries,)
  # jnp.round rounds half to even, like Python's round() in torchvision.
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)  # (tries,)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)  # (tries,)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits)  # index of the first True (0 when none fits)

  # No try fitted: the whole image, center-cropped to the nearest allowed
  # ratio. It depends on static shapes only, so plain Python computes it.
  if width / height < min(ratio):
    fallback_h, fallback_w = int(round(width / min(ratio))), width
  elif width / height > max(ratio):
    fallback_h, fallback_w = height, int(round(height * max(ratio)))
  else:
    fallback_h, fallback_w = height, width
  found = fits[first]
  h = jnp.where(found, h[first], fallback_h)
  w = jnp.where(found, w[first], fallback_w)
  # A uniform integer offset in [0, height - h] (torch.randint in torchvision).
  top = jnp.where(found, jnp.minimum(jnp.floor(u[-2] * (height - h + 1)), height - h),
                  (height - fallback_h) // 2)
  left = jnp.where(found, jnp.minimum(jnp.floor(u[-1] * (width - w + 1)), width - w),
                   (width - fallback_w) // 2)
  return jnp.stack([top, left, h, w]).astype(jnp.int32)


def resized_crop(image: jax.Array, box: jax.Array, size: int,
                 interpolation: str = 'bilinear') -> jax.Array:
  """Crops the (top, left, h, w) box and resizes it to (size, size, C), antialiased."""
  if interpolation not in _METHODS:
    raise ValueError(f'interpolation={interpolation!r}; expected one of {sorted(_METHODS)}')
  height, width, channels = image.shape
  top, left, h, w = box[0], box[1], box[2], box[3]
  # The box has a traced size, so it cannot be sliced out; instead resize the
  # whole image with the box's scale and offset, and keep the filter from
  # reading pixels outside the box, as torchvision's crop-then-resize (Pillow)
  # does: resize(image * inside) / resize(inside) renormalises each output
  # pixel's weights over the in-box pixels only (the weights are separable).
  rows = (jnp.arange(height) >= top) & (jnp.arange(height) < top + h)  # (H,)
  cols = (jnp.arange(width) >= left) & (jnp.arange(width) < left + w)  # (W,)
  inside = (rows[:, None] & cols[None, :]).astype(jnp.float32)[..., None]  # (H, W, 1)
  stacked = jnp.concatenate([image * inside, inside], axis=-1)  # (H, W, C + 1)
  scale = size / jnp.stack([h, w]).astype(jnp.float32)  # output pixels per input pixel
  translation = -jnp.stack([top, left]).astype(jnp.float32) * scale
  resized = jax.image.scale_and_translate(
      stacked, (size, size, channels + 1), (0, 1), scale, translation,
      method=_METHODS[interpolation], antialias=True)  # (size, size, C + 1)
  # Bicubic overshoots; Pillow clamps to uint8, we clamp to [0, 1].
  return jnp.clip(resized[..., :channels] / resized[..., channels:], 0.0, 1.0)


def random_resized_crop(key: jax.Array, image: jax.Array, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        interpolation: str = 'bilinear') -> jax.Array:
  """Inception-style crop of (H, W, C) resized to (size, size, C); torchvision's boxes."""
  height, width = image.shape[:2]
  box = random_resized_crop_box(key, height, width, scale, ratio)
  return resized_crop(image, box, size, interpolation)


def horizontal_flip(key: jax.Array, image: jax.Array, p: float = 0.5) -> jax.Array:
  """Mirrors (H, W, C) left-right with probability p."""
  return jnp.where(bernoulli(key, p), image[:, ::-1], image)


# ------------------------------------------------------------ composed views ---


def view(key: jax.Array, image: jax.Array, *, size: int,
         crop_scale: tuple[float, float] = (0.08, 1.0),
         crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = 'bicubic',
         flip_prob: float = 0.5, **colour) -> jax.Array:
  """One random view of one (H, W, C) image -> (size, size, C): crop, flip, `photometric`."""
  crop_key, flip_key, colour_key = jax.random.split(key, 3)
  image = random_resized_crop(crop_key, image, size, crop_scale, crop_ratio, interpolation)
  if flip_prob > 0:
    image = horizontal_flip(flip_key, image, flip_prob)
  return photometric(colour_key, image, **colour)  # (size, size, C)


def simclr_view(key: jax.Array, image: jax.Array, *, size: int,
                crop_scale: tuple[float, float] = (0.08, 1.0),
                crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                interpolation: str = 'bicubic', **colour) -> jax.Array:
  """A whole SimCLR view of (H, W, C) cropped on device -> (size, size, C) (a library op)."""
  crop_key, colour_key = jax.random.split(key)
  image = view(crop_key, image, size=size, crop_scale=crop_scale, crop_ratio=crop_ratio,
               interpolation=interpolation, flip_prob=0.5 if flip else 0.0)
  return simclr_colour(colour_key, image, **colour)
