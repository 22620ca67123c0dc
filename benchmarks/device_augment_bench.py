"""Throughput of the colour part of SimCLR's two views: on device vs on the host.

Run from the repository root:

  python -m benchmarks.device_augment_bench [--batch 256] [--size 32] [--rounds 7]

SimCLR's views are cut on the host (random resized crop of the whole image +
flip, `pipeline.MultiViewTransform`); their colour is made either on device,
as the trainer does (`device_augment.augment_views(..., simclr_colour)`,
jitted, on a uint8 (B, 2, S, S, 3) batch already on the device), or on the
host as a PyTorch/grain worker would per view with Pillow: ColorJitter
through PIL.ImageEnhance and an HSV hue shift in a random order,
RandomGrayscale and PIL's GaussianBlur. The host geometry, the same for both,
is timed on its own ('host crops' rows). The sides are timed in alternation
within one run because this machine's speed drifts by up to 2x between runs;
the table shows the median over rounds and the spread (min-max).
"""

import argparse
import statistics
import time

import jax
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from ssl_jax import host_memory
from ssl_jax.data import augment, pipeline
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


def host_colour(view: np.ndarray, rng: np.random.Generator, strength: float,
                blur_prob: float) -> np.ndarray:
  """SimCLR's colour ops on one uint8 (S, S, 3) view on the host -> float32 (S, S, 3)."""
  pil = Image.fromarray(view)
  if rng.random() < 0.8:
    pil = _host_jitter(pil, rng, strength)
  if rng.random() < 0.2:
    pil = pil.convert('L').convert('RGB')
  if rng.random() < blur_prob:
    pil = pil.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
  return np.asarray(pil, np.float32) / 255.0


def host_view(image: np.ndarray, rng: np.random.Generator, size: int, strength: float,
              blur_prob: float) -> np.ndarray:
  """One whole SimCLR view of a uint8 (H, W, 3) image on the host -> float32 (size, size, 3)."""
  crop = augment.random_resized_crop(image, rng, size, interpolation='bicubic')
  return host_colour(augment.horizontal_flip(crop, rng), rng, strength, blur_prob)


def host_crops(images: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
  """uint8 (B, H, W, 3) -> uint8 (B, 2, size, size, 3): the trainer's host views."""
  spec = pipeline.ViewSpec('views', 2, size, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 'bicubic')
  transform = pipeline.MultiViewTransform((spec,), 3)
  return np.stack([transform.random_map({'image': x, 'label': 0}, rng)['views']
                   for x in images])


def host_two_colours(views: np.ndarray, rng: np.random.Generator, strength: float,
                     blur_prob: float) -> np.ndarray:
  """uint8 (B, 2, S, S, 3) -> float32 (B, 2, S, S, 3), coloured on the host."""
  return np.stack([[host_colour(v, rng, strength, blur_prob) for v in pair] for pair in views])


# ---------------------------------------------------------------- device side ---


def device_two_colours(strength: float, blur_prob: float):
  """A jitted (key, uint8 (B, 2, S, S, C)) -> float32 (B, 2, S, S, C) function."""

  @jax.jit
  def two_colours(key: jax.Array, views: jax.Array) -> jax.Array:
    return da.augment_views(key, views, da.simclr_colour, jitter_strength=strength,
                            blur_prob=blur_prob)

  return two_colours


# ---------------------------------------------------------------------- main ---


def main() -> None:
  """Times both sides of every recipe in alternation and prints a table."""
  host_memory.keep_freed_memory()  # As the entry points do, before jax starts its backend.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=7)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  # Sources a little larger than the views, as photos are (4:3).
  images = rng.integers(0, 256, (args.batch, args.size * 3 // 2, args.size * 2, 3), np.uint8)
  views = host_crops(images, rng, args.size)
  views_on_device = jax.device_put(views)
  print(f'{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}; '
        f'batch {args.batch} of {images.shape[1]}x{images.shape[2]}x3 uint8, two views of '
        f'{args.size}x{args.size} each')

  device_fns, rates = {}, {'host crops': []}
  for name, (strength, blur_prob) in RECIPES.items():
    device_fns[name] = device_two_colours(strength, blur_prob)
    start = time.perf_counter()
    device_fns[name](jax.random.key(0), views_on_device).block_until_ready()
    print(f'compile + first call [{name}]: {time.perf_counter() - start:.1f} s')
    rates[name, 'device'], rates[name, 'host'] = [], []

  key = jax.random.key(1)
  for _ in range(args.rounds):
    start = time.perf_counter()
    host_crops(images, rng, args.size)
    rates['host crops'].append(args.batch / (time.perf_counter() - start))
    for name, (strength, blur_prob) in RECIPES.items():
      # Device: a few calls per round, each on a fresh key, as in training.
      calls = 5
      start = time.perf_counter()
      for _ in range(calls):
        key, step_key = jax.random.split(key)
        device_fns[name](step_key, views_on_device).block_until_ready()
      rates[name, 'device'].append(calls * args.batch / (time.perf_counter() - start))
      start = time.perf_counter()
      host_two_colours(views, rng, strength, blur_prob)
      rates[name, 'host'].append(args.batch / (time.perf_counter() - start))

  crops = rates.pop('host crops')
  print(f'\nhost crops (both sides, 1 thread): {statistics.median(crops):,.0f} images/s '
        f'({min(crops):,.0f}-{max(crops):,.0f})')
  print(f'\n{"colour of 2 views":28s} {"side":7s} {"images/s (median)":>18s} {"min-max":>17s} '
        f'{"x host":>7s}')
  for name in RECIPES:
    host = statistics.median(rates[name, 'host'])
    for side in ('device', 'host'):
      values = rates[name, side]
      median = statistics.median(values)
      print(f'{name:28s} {side:7s} {median:18,.0f} {min(values):8,.0f}-{max(values):<8,.0f} '
            f'{median / host:7.1f}')


if __name__ == '__main__':
  main()
