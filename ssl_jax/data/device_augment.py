"""Image augmentations that run on device, inside the jitted train step.

Every op takes a float32 image in [0, 1] of shape (H, W, C), C = 1 or 3, and
its own PRNG key; there is no Python control flow on traced values, so a view
function can be `vmap`ped over a batch with one key per example (see
`augment_batch`). Random ops come in two layers: a deterministic op with the
parameter given (`adjust_contrast(image, factor)`, `blur(image, sigma, ...)`),
which tests compare against reference formulas, and a random op that samples
the parameter and applies it with probability `p`.

Semantics follow torchvision, which DINO (facebookresearch/dino, main_dino.py,
DataAugmentationDINO) and most PyTorch SimCLR ports use; where SimCLR's own
TensorFlow code (google-research/simclr, tf2/data_util.py) differs, the
function's docstring says how.

SimCLR and DINO train on views the HOST cuts from the whole decoded image
(random resized crop + flip, `pipeline.ViewSpec`); on device they only get
their colour (`photometric`: jitter, grayscale, blur, solarize), one key per
view and example: `simclr_colour` via `augment_views`, and `dino_colour`.
The on-device crops (`random_resized_crop`, `view`) are a library in
`device_crop`, e.g. to crop images that are already resident on device.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ssl_jax.data.augment import LUMA_601
from ssl_jax.data.normalize import to_unit


def bernoulli(key: jax.Array, p: float | jax.Array) -> jax.Array:
  """A boolean scalar that is True with probability p (p=0 never, p=1 always)."""
  return jax.random.uniform(key) < p


# -------------------------------------------------------------------- colour ---


def luma(image: jax.Array) -> jax.Array:
  """(H, W, C) -> (H, W, 1) ITU-R BT.601 luma (the image itself when C = 1)."""
  # Pillow's convert('L') weights (0.299, 0.587, 0.114), which DINO's PIL
  # pipeline uses; torchvision tensors and TF use 0.2989 for red.
  if image.shape[-1] == 1:
    return image
  return (image @ jnp.asarray(LUMA_601))[..., None]


def to_grayscale(image: jax.Array) -> jax.Array:
  """(H, W, C) -> (H, W, C) luma replicated over the channels."""
  return jnp.broadcast_to(luma(image), image.shape)


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
  """factor * image + (1 - factor) * other, clipped to [0, 1] (torchvision _blend)."""
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Multiplies by factor (torchvision; SimCLR's impl='simclrv2'), clipped."""
  return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Blends with the mean luma of the whole image (torchvision), clipped."""
  # TF's adjust_contrast (SimCLR) blends each channel with its own mean
  # instead, which keeps the colour balance; torchvision pulls towards grey.
  return _blend(image, jnp.mean(luma(image)), factor)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Blends with the luma image (torchvision), clipped; a no-op for C = 1."""
  # TF's adjust_saturation (SimCLR) scales S in HSV space instead.
  if image.shape[-1] == 1:
    return image
  return _blend(image, luma(image), factor)


def _fraction(x: jax.Array) -> jax.Array:
  """x mod 1 as x - floor(x): XLA's float remainder (jnp's %) is ~10x slower on CPU."""
  return x - jnp.floor(x)


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
  """(..., 3) RGB in [0, 1] -> (..., 3) HSV in [0, 1], hue 0 for greys."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  value = jnp.max(rgb, axis=-1)
  chroma = value - jnp.min(rgb, axis=-1)
  saturation = chroma / jnp.where(value > 0, value, 1.0)
  safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
  hue = jnp.where(value == r, (g - b) / safe_chroma,
                  jnp.where(value == g, 2.0 + (b - r) / safe_chroma, 4.0 + (r - g) / safe_chroma))
  hue = jnp.where(chroma > 0, _fraction(hue / 6.0), 0.0)
  return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """(..., 3) HSV in [0, 1] -> (..., 3) RGB in [0, 1]."""
  # The branch-free form of the sextant formula: channel n (5 for R, 3 for G,
  # 1 for B) is v - v s clip(min(k, 4 - k), 0, 1) with k = (n + 6 h) mod 6.
  hue, saturation, value = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
  k = 6.0 * _fraction((jnp.asarray([5.0, 3.0, 1.0]) + 6.0 * hue) / 6.0)  # (..., 3)
  return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hue(image: jax.Array, shift: jax.Array) -> jax.Array:
  """Rotates the hue by shift (a fraction of the circle) in HSV; a no-op for C = 1."""
  # torchvision adjust_hue and TF adjust_hue (SimCLR) agree: h -> (h + shift) mod 1.
  if image.shape[-1] == 1:
    return image
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set(_fraction(hsv[..., 0] + shift))
  return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def color_jitter_params(key: jax.Array, brightness: float = 0.0, contrast: float = 0.0,
                        saturation: float = 0.0, hue: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Samples (order (4,), params (4,)): the op order, then b/c/s factors and the hue shift."""
  # torchvision ColorJitter.get_params: factors ~ U[max(0, 1 - x), 1 + x], the
  # hue shift ~ U[-hue, hue], and a random permutation of the four ops
  # (0 brightness, 1 contrast, 2 saturation, 3 hue). One draw of 8 uniforms.
  if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
    raise ValueError(f'color_jitter needs brightness, contrast, saturation >= 0 and hue in '
                     f'[0, 0.5], got {brightness}, {contrast}, {saturation}, {hue}')
  u = jax.random.uniform(key, (8,))
  low = jnp.asarray([max(0.0, 1.0 - x) for x in (brightness, contrast, saturation)] + [-hue])
  high = jnp.asarray([1.0 + brightness, 1.0 + contrast, 1.0 + saturation, hue])
  params = low + (high - low) * u[:4]  # (4,)
  order = jnp.argsort(u[4:])  # (4,) a uniformly random permutation
  return order, params


def color_jitter(key: jax.Array, image: jax.Array, brightness: float = 0.0,
                 contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0,
                 p: float = 1.0) -> jax.Array:
  """torchvision ColorJitter in a random order per image, applied with probability p."""
  # Each op clips to [0, 1] (torchvision ColorJitter; SimCLR's
  # color_jitter_rand also shuffles the four ops and clips after each). An op
  # whose strength is 0 is skipped, as in both. On C = 1 images saturation and
  # hue are no-ops (as in torchvision): a grey image has no colour to change.
  apply_key, params_key = jax.random.split(key)
  order, params = color_jitter_params(params_key, brightness, contrast, saturation, hue)
  # Under vmap, a switch on the traced order would run every op at each of the
  # four positions: four HSV round trips per image, most of a view's time.
  # Instead run the three cheap blends in order, those before the hue shift,
  # the hue shift once, then those after it. A disabled blend has factor 1
  # exactly, which is the identity, like torchvision's skipping it.
  hue_at = jnp.argmax(order == 3)  # how many blends come before the hue shift
  blends = order[jnp.argsort(order == 3, stable=True)[:3]]  # (3,) the other ops, in order
  blend_ops = [adjust_brightness, adjust_contrast, adjust_saturation]

  def blend(x: jax.Array, slot: int) -> jax.Array:
    return jax.lax.switch(blends[slot], blend_ops, x, params[blends[slot]])

  jittered = image
  for slot in range(3):
    jittered = jnp.where(slot < hue_at, blend(jittered, slot), jittered)
  if hue > 0:
    jittered = adjust_hue(jittered, params[3])
  for slot in range(3):
    jittered = jnp.where(slot >= hue_at, blend(jittered, slot), jittered)
  return jnp.where(bernoulli(apply_key, p), jittered, image)


def grayscale(key: jax.Array, image: jax.Array, p: float) -> jax.Array:
  """Replaces (H, W, C) by its luma on every channel with probability p."""
  return jnp.where(bernoulli(key, p), to_grayscale(image), image)


# ---------------------------------------------------------- blur and solarize ---


def gaussian_kernel(sigma: jax.Array, kernel_size: int) -> jax.Array:
  """(2 * (kernel_size // 2) + 1,) normalised Gaussian taps; an even size grows by one."""
  radius = kernel_size // 2  # SimCLR gaussian_blur: an even size becomes size + 1.
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  taps = jnp.exp(-0.5 * (x / sigma) ** 2)
  return taps / jnp.sum(taps)


def blur(image: jax.Array, sigma: jax.Array, kernel_size: int | None = None) -> jax.Array:
  """Separable Gaussian blur of (H, W, C) with reflect padding; kernel ~10% of H by default."""
  # SimCLR random_blur: kernel_size = height // 10 and sigma ~ U(0.1, 2). Its
  # 'SAME' convolution pads with zeros, which darkens a border of the image;
  # we pad by reflection, as torchvision's GaussianBlur does. (DINO blurs with
  # PIL's GaussianBlur(radius=sigma), a box-blur approximation that extends
  # edge pixels; with sigma <= 2 the three agree away from the border.)
  height, width = image.shape[:2]
  kernel = gaussian_kernel(sigma, height // 10 if kernel_size is None else kernel_size)
  radius = kernel.shape[0] // 2
  if radius >= min(height, width):
    raise ValueError(f'A blur kernel of {kernel.shape[0]} taps needs an image larger than '
                     f'{height}x{width}; pass a smaller kernel_size.')
  for axis, n in ((0, height), (1, width)):
    padding = [(0, 0)] * image.ndim
    padding[axis] = (radius, radius)
    padded = jnp.pad(image, padding, mode='reflect')
    image = sum(kernel[t] * jax.lax.slice_in_dim(padded, t, t + n, axis=axis)
                for t in range(kernel.shape[0]))
  return image


def gaussian_blur(key: jax.Array, image: jax.Array, p: float,
                  sigma: tuple[float, float] = (0.1, 2.0),
                  kernel_size: int | None = None) -> jax.Array:
  """Blurs (H, W, C) with sigma ~ U(sigma) with probability p (SimCLR, DINO)."""
  u = jax.random.uniform(key, (2,))  # apply, sigma
  sampled = sigma[0] + (sigma[1] - sigma[0]) * u[1]
  return jnp.where(u[0] < p, blur(image, sampled, kernel_size), image)


def solarize(key: jax.Array, image: jax.Array, p: float, threshold: float = 0.5) -> jax.Array:
  """Inverts pixels >= threshold with probability p (DINO utils.Solarization)."""
  # PIL's ImageOps.solarize(threshold=128) inverts uint8 values >= 128, the
  # same pixels as x >= 0.5 for x = value / 255; torchvision also uses >=.
  solarized = jnp.where(image >= threshold, 1.0 - image, image)
  return jnp.where(bernoulli(key, p), solarized, image)


# ------------------------------------------------------------ composed views ---


def photometric(key: jax.Array, image: jax.Array, *, brightness: float = 0.0,
                contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0,
                jitter_prob: float = 0.0, grayscale_prob: float = 0.0, blur_prob: float = 0.0,
                blur_sigma: tuple[float, float] = (0.1, 2.0), blur_kernel_size: int | None = None,
                solarize_prob: float = 0.0) -> jax.Array:
  """The colour part of a view of (H, W, C): jitter, grayscale, blur, solarize, in that order."""
  # The order of SimCLR's preprocess_for_train + random_blur and of DINO's
  # DataAugmentationDINO after their crop and flip. Ops with probability 0 are
  # left out of the program (they would be no-ops).
  jitter_key, gray_key, blur_key, solarize_key = jax.random.split(key, 4)
  if jitter_prob > 0:
    image = color_jitter(jitter_key, image, brightness, contrast, saturation, hue, jitter_prob)
  if grayscale_prob > 0:
    image = grayscale(gray_key, image, grayscale_prob)
  if blur_prob > 0:
    image = gaussian_blur(blur_key, image, blur_prob, blur_sigma, blur_kernel_size)
  if solarize_prob > 0:
    image = solarize(solarize_key, image, solarize_prob)
  return image


def simclr_colour(key: jax.Array, image: jax.Array, *, jitter_strength: float = 1.0,
                  jitter_prob: float = 0.8, grayscale_prob: float = 0.2,
                  blur_prob: float = 0.5) -> jax.Array:
  """SimCLR's colour distortion and blur of one (H, W, C) view; defaults: ImageNet."""
  # SimCLR (Chen et al. 2020, appendix A; tf2/data_util.py color_jitter and
  # random_color_jitter, lines 53-75 and 382-390): brightness, contrast,
  # saturation 0.8 s and hue 0.2 s for strength s (1.0 on ImageNet, 0.5 on
  # CIFAR-10), applied with p 0.8, then grayscale with p 0.2; blur (lines
  # 393-410) with p 0.5 on ImageNet only (pass 0 for CIFAR).
  return photometric(key, image, brightness=0.8 * jitter_strength,
                     contrast=0.8 * jitter_strength, saturation=0.8 * jitter_strength,
                     hue=0.2 * jitter_strength, jitter_prob=jitter_prob,
                     grayscale_prob=grayscale_prob, blur_prob=blur_prob)


def augment_batch(key: jax.Array, images: jax.Array,
                  view_fn: Callable[..., jax.Array], **view_kwargs) -> jax.Array:
  """uint8 (B, H, W, C) -> float32 (B, size, size, C) views, one key per example."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'augment_batch expects (B, H, W, 1|3) images, got shape {images.shape}')
  if images.dtype == jnp.uint8:
    images = to_unit(images)
  # Float images are taken to be in [0, 1] already.
  keys = jax.random.split(key, images.shape[0])  # (B,) keys
  return jax.vmap(functools.partial(view_fn, **view_kwargs))(keys, images.astype(jnp.float32))


def augment_views(key: jax.Array, views: jax.Array, view_fn: Callable[..., jax.Array],
                  **view_kwargs) -> jax.Array:
  """uint8 (B, V, H, W, C) host views -> float32 (B, V, H', W', C), one key per view and example.

  View v of example b gets key split(split(key, V)[v], B)[b]. The V views
  are one `vmap`, so the program holds one `view_fn`, not V.
  """
  if views.ndim != 5:
    raise ValueError(f'augment_views expects (B, V, H, W, C) views, got shape {views.shape}')
  keys = jax.random.split(key, views.shape[1])  # (V,)
  return jax.vmap(lambda view_key, images: augment_batch(view_key, images, view_fn, **view_kwargs),
                  in_axes=(0, 1), out_axes=1)(keys, views)


def dino_colour(key: jax.Array, global_views: jax.Array, local_views: jax.Array | None, *,
                brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.2,
                hue: float = 0.1, jitter_prob: float = 0.8, grayscale_prob: float = 0.2,
                global_blur_probs: tuple[float, float] = (1.0, 0.1),
                global_solarize_probs: tuple[float, float] = (0.0, 0.2),
                local_blur_prob: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0),
                blur_kernel_size: int | None = None) -> tuple[jax.Array, jax.Array | None]:
  """DINO's colour ops on the host's crops: uint8 (B, 2, G, G, C), (B, n, L, L, C) -> float32.

  DataAugmentationDINO (facebookresearch/dino, main_dino.py lines 419-464);
  the defaults are its ImageNet settings. Every crop gets colour jitter (p
  0.8) and grayscale (p 0.2) after its crop and flip (lines 421-428, made on
  the host); the two global crops are blurred with p 1.0 and 0.1 and the
  second is solarized with p 0.2 (lines 438-446); the local crops are
  blurred with p 0.5 (line 454). `blur_sigma` is PIL's radius, in output
  pixels (utils.py GaussianBlur). Each view has its own key and each
  example its own key within a view.

  Returns:
    (global views (B, 2, G, G, C), local views (B, n, L, L, C) or None when
    `local_views` is None), float32 in [0, 1].
  """
  if global_views.shape[1] != len(global_blur_probs):
    raise ValueError(f'{global_views.shape[1]} global views but {len(global_blur_probs)} '
                     'global blur probabilities')
  jitter = dict(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                jitter_prob=jitter_prob, grayscale_prob=grayscale_prob)
  # The two global views differ only in their blur and solarize probabilities:
  # passed as arrays, one vmapped program colours both (compiling a view costs
  # seconds on CPU; running it, milliseconds).
  def global_colour(view_key: jax.Array, image: jax.Array, blur_prob: jax.Array,
                    solarize_prob: jax.Array) -> jax.Array:
    view_key, blur_key, solarize_key = jax.random.split(view_key, 3)
    image = photometric(view_key, image, **jitter)
    image = gaussian_blur(blur_key, image, blur_prob, blur_sigma, blur_kernel_size)
    return solarize(solarize_key, image, solarize_prob)

  global_keys = jax.random.split(jax.random.fold_in(key, 0), global_views.shape[1])
  global_out = jax.vmap(
      lambda view_key, images, blur_prob, solarize_prob: augment_batch(
          view_key, images, global_colour, blur_prob=blur_prob, solarize_prob=solarize_prob),
      in_axes=(0, 1, 0, 0), out_axes=1)(
          global_keys, global_views, jnp.asarray(global_blur_probs, jnp.float32),
          jnp.asarray(global_solarize_probs, jnp.float32))
  if local_views is None:
    return global_out, None
  local_out = augment_views(jax.random.fold_in(key, 1), local_views, photometric,
                            blur_prob=local_blur_prob, blur_sigma=blur_sigma,
                            blur_kernel_size=blur_kernel_size, **jitter)
  return global_out, local_out
