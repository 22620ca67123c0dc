"""Throughput of SimCLR two-view augmentation: on device (jitted, vmapped) vs on the host.

Run from the repository root:

  python -m benchmarks.device_augment_bench [--batch 256] [--size 32] [--rounds 7]

The device side is `device_augment.augment_batch(..., simclr_view)` twice (two
views), jitted, on a uint8 batch already on the device. The host side is what
a PyTorch/grain worker does per image with Pillow: the torchvision-style crop
from `ssl_jax.data.augment`, flip, ColorJitter through PIL.ImageEnhance and an
HSV hue shift in a random order, RandomGrayscale and PIL's GaussianBlur. The
two are timed in alternation within one run because this machine's speed
drifts by up to 2x between runs; the table shows the median over rounds and
the spread (min-max).
"""

import argparse
import statistics
import time

import jax
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from ssl_jax.data import augment
from ssl_jax.data import device_augment as da

# name -> (jitter strength, blur probability): SimCLR's CIFAR-10 and ImageNet recipes.
RECIPES = {'cifar (s=0.5, no blur)': (0.5, 0.0), 'imagenet (s=1.0, blur 0.5)': (1.0, 0.5)}


# ------------------------------------------------------------------ host side ---


def _host_jitter(image: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
  """torchvision ColorJitter on a PIL image: PIL enhancers and an HSV hue shift, random order."""
  b = c = s = 0.8 * strength
  hue = 0.2 * strength

  def shift_hue(img: Image.Image) -> Image.Image:
    h, sat, v = img.convert('HSV').split()
    shifted = (np.asarray(h, np.int16) + int(rng.uniform(-hue, hue) * 255)) % 256  # wraps
    return Image.merge('HSV', (Image.fromarray(shifted.astype(np.uint8), 'L'), sat, v)).convert(
        'RGB')

  ops = [lambda img: ImageEnhance.Brightness(img).enhance(rng.uniform(max(0, 1 - b), 1 + b)),
         lambda img: ImageEnhance.Contrast(img).enhance(rng.uniform(max(0, 1 - c), 1 + c)),
         lambda img: ImageEnhance.Color(img).enhance(rng.uniform(max(0, 1 - s), 1 + s)),
         shift_hue]
  for index in rng.permutation(4):
    image = ops[index](image)
  return image


def host_view(image: np.ndarray, rng: np.random.Generator, size: int, strength: float,
              blur_prob: float) -> np.ndarray:
  """One SimCLR view of a uint8 (H, W, 3) image on the host -> float32 (size, size, 3)."""
  crop = augment.random_resized_crop(image, rng, size, interpolation='bicubic')
  pil = Image.fromarray(augment.horizontal_flip(crop, rng))
  if rng.random() < 0.8:
    pil = _host_jitter(pil, rng, strength)
  if rng.random() < 0.2:
    pil = pil.convert('L').convert('RGB')
  if rng.random() < blur_prob:
    pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
  return np.asarray(pil, np.float32) / 255.0


def host_two_views(images: np.ndarray, rng: np.random.Generator, size: int, strength: float,
                   blur_prob: float) -> np.ndarray:
  """uint8 (B, H, W, 3) -> float32 (2, B, size, size, 3) on the host."""
  return np.stack([np.stack([host_view(x, rng, size, strength, blur_prob) for x in images])
                   for _ in range(2)])


# ---------------------------------------------------------------- device side ---


def device_two_views(size: int, strength: float, blur_prob: float):
  """A jitted (key, uint8 (B, H, W, C)) -> float32 (2, B, size, size, C) function."""

  @jax.jit
  def two_views(key: jax.Array, images: jax.Array) -> jax.Array:
    key_1, key_2 = jax.random.split(key)
    kwargs = dict(size=size, jitter_strength=strength, blur_prob=blur_prob)
    return jax.numpy.stack([da.augment_batch(key_1, images, da.simclr_view, **kwargs),
                            da.augment_batch(key_2, images, da.simclr_view, **kwargs)])

  return two_views


# ---------------------------------------------------------------------- main ---


def main() -> None:
  """Times both sides of every recipe in alternation and prints a table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=7)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
  images_on_device = jax.device_put(images)
  print(f'{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}; '
        f'batch {args.batch} of {args.size}x{args.size}x3 uint8, two views each')

  device_fns, rates = {}, {}
  for name, (strength, blur_prob) in RECIPES.items():
    device_fns[name] = device_two_views(args.size, strength, blur_prob)
    start = time.perf_counter()
    device_fns[name](jax.random.key(0), images_on_device).block_until_ready()
    print(f'compile + first call [{name}]: {time.perf_counter() - start:.1f} s')
    rates[name, 'device'], rates[name, 'host'] = [], []

  key = jax.random.key(1)
  for _ in range(args.rounds):
    for name, (strength, blur_prob) in RECIPES.items():
      # Device: a few calls per round, each on a fresh key, as in training.
      calls = 5
      start = time.perf_counter()
      for _ in range(calls):
        key, step_key = jax.random.split(key)
        device_fns[name](step_key, images_on_device).block_until_ready()
      rates[name, 'device'].append(calls * args.batch / (time.perf_counter() - start))
      start = time.perf_counter()
      host_two_views(images, rng, args.size, strength, blur_prob)
      rates[name, 'host'].append(args.batch / (time.perf_counter() - start))

  print(f'\n{"recipe":28s} {"side":7s} {"images/s (median)":>18s} {"min-max":>17s} {"x host":>7s}')
  for name in RECIPES:
    host = statistics.median(rates[name, 'host'])
    for side in ('device', 'host'):
      values = rates[name, side]
      median = statistics.median(values)
      print(f'{name:28s} {side:7s} {median:18,.0f} {min(values):8,.0f}-{max(values):<8,.0f} '
            f'{median / host:7.1f}')


if __name__ == '__main__':
  main()
