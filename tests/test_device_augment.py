"""On-device augmentations against NumPy / colorsys / Pillow references and the host crop."""

import colorsys
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

from ssl_jax.data import augment
from ssl_jax.data import device_augment as da
from ssl_jax.data import device_crop as dc

LUMA = np.array([0.299, 0.587, 0.114])


def _image(shape, seed=0):
  return np.random.default_rng(seed).random(shape).astype(np.float32)


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


# -------------------------------------------------- NumPy references (torchvision) ---


def _np_luma(x):
  return x @ LUMA if x.shape[-1] == 3 else x[..., 0]


def _np_blend(x, other, factor):
  return np.clip(factor * x + (1 - factor) * other, 0, 1)


def _np_brightness(x, f):
  return _np_blend(x, 0.0, f)


def _np_contrast(x, f):
  return _np_blend(x, _np_luma(x).mean(), f)


def _np_saturation(x, f):
  return x if x.shape[-1] == 1 else _np_blend(x, _np_luma(x)[..., None], f)


def _np_hue(x, shift):
  if x.shape[-1] == 1:
    return x
  out = np.empty_like(x)
  for index in np.ndindex(x.shape[:-1]):
    h, s, v = colorsys.rgb_to_hsv(*x[index])
    out[index] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
  return out


NP_OPS = [_np_brightness, _np_contrast, _np_saturation, _np_hue]

# ------------------------------------------------------------------- crop box ---


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _boxes(keys, height, width, scale, ratio):
  return jax.vmap(lambda k: dc.random_resized_crop_box(k, height, width, scale, ratio))(keys)


def test_crop_box_statistics():
  # Every try fits a 400x400 image: area ~ U(0.1, 0.3), log ratio ~ U(log .5, log 2).
  tops, lefts, hs, ws = np.asarray(_boxes(_keys(4000), 400, 400, (0.1, 0.3), (0.5, 2.0))).T
  area = hs * ws / 400**2
  assert area.min() > 0.1 - 0.005 and area.max() < 0.3 + 0.005  # rounding slack
  assert abs(area.mean() - 0.2) < 0.005  # sd of the mean 0.0009
  log_ratio = np.log(ws / hs)
  assert log_ratio.min() > math.log(0.5) - 0.02 and log_ratio.max() < math.log(2) + 0.02
  assert abs(log_ratio.mean()) < 0.02 and abs(np.std(log_ratio) - math.log(4) / 12**0.5) < 0.02
  assert (tops >= 0).all() and (lefts >= 0).all()
  assert (tops + hs <= 400).all() and (lefts + ws <= 400).all()
  # Offsets are uniform over the free range: their mean is half of it.
  assert abs(np.mean(tops / (400 - hs)) - 0.5) < 0.02 and tops.min() == 0


def test_crop_box_distribution_matches_the_host_sampler():
  # 64x48 with the default scale rejects many tries (w > 48): the first-fit
  # and fallback logic both matter. Compare quantiles of area and log ratio.
  device = np.asarray(_boxes(_keys(4000, seed=1), 64, 48, (0.08, 1.0), (3 / 4, 4 / 3)))
  rng = np.random.default_rng(0)
  host = np.array([augment.random_resized_crop_box(64, 48, rng) for _ in range(4000)])
  for boxes in (device, host):
    assert (boxes[:, 0] + boxes[:, 2] <= 64).all() and (boxes[:, 1] + boxes[:, 3] <= 48).all()
  quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
  area = [np.quantile(b[:, 2] * b[:, 3] / (64 * 48), quantiles) for b in (device, host)]
  np.testing.assert_allclose(area[0], area[1], atol=0.03)
  log_ratio = [np.quantile(np.log(b[:, 3] / b[:, 2]), quantiles) for b in (device, host)]
  np.testing.assert_allclose(log_ratio[0], log_ratio[1], atol=0.03)
  # A 10x40 strip cannot hold a full-area square: torchvision's center fallback.
  for height, width, ratio in ((10, 40, (1, 1)), (40, 10, (0.5, 1)), (41, 11, (0.5, 1))):
    want = augment.random_resized_crop_box(height, width, rng, (1, 1), ratio)
    got = dc.random_resized_crop_box(jax.random.key(0), height, width, (1, 1), ratio)
    assert tuple(np.asarray(got)) == want


# ---------------------------------------------------------------- crop resize ---


@functools.partial(jax.jit, static_argnums=(2, 3))
def _resized_crop(image, box, size, interpolation):
  return dc.resized_crop(image, box, size, interpolation)


@pytest.mark.parametrize('interpolation,pil_filter', [
    ('bilinear', Image.Resampling.BILINEAR), ('bicubic', Image.Resampling.BICUBIC)])
def test_resized_crop_equals_pillow_crop_then_resize(interpolation, pil_filter):
  # Pillow's float mode ('F') resamples without uint8 rounding between its two
  # passes, so it is the exact reference for torchvision's crop-then-resize.
  image = _image((30, 24, 3), seed=1)
  for box in [(3, 2, 17, 11), (0, 0, 30, 24), (5, 7, 4, 3), (12, 0, 18, 24)]:
    top, left, h, w = box
    crop = image[top:top + h, left:left + w]
    want = np.stack([np.asarray(Image.fromarray(crop[..., c], 'F').resize((16, 16), pil_filter))
                     for c in range(3)], axis=-1)
    got = _resized_crop(image, jnp.array(box), 16, interpolation)
    np.testing.assert_allclose(got, np.clip(want, 0, 1), atol=2e-6)


def test_full_square_crop_is_a_plain_resize():
  image = _image((20, 20, 3), seed=2)
  crop = jax.jit(jax.vmap(lambda k: dc.random_resized_crop(
      k, image, 12, scale=(1, 1), ratio=(1, 1), interpolation='bicubic')))
  for got in crop(_keys(3)):
    want = jax.image.resize(image, (12, 12, 3), 'cubic', antialias=True)
    np.testing.assert_allclose(got, jnp.clip(want, 0, 1), atol=1e-6)


def test_flip():
  image = _image((3, 4, 1))
  np.testing.assert_array_equal(dc.horizontal_flip(jax.random.key(0), image, 1.0), image[:, ::-1])
  np.testing.assert_array_equal(dc.horizontal_flip(jax.random.key(0), image, 0.0), image)


# -------------------------------------------------------------------- colour ---


@pytest.mark.parametrize('channels', [1, 3])
def test_colour_ops_match_torchvision_formulas(channels):
  image = _image((5, 6, channels), seed=3)
  for factor in (0.3, 1.0, 1.7):
    np.testing.assert_allclose(da.adjust_brightness(image, factor),
                               _np_brightness(image, factor), atol=1e-6)
    np.testing.assert_allclose(da.adjust_contrast(image, factor),
                               _np_contrast(image, factor), atol=1e-6)
    np.testing.assert_allclose(da.adjust_saturation(image, factor),
                               _np_saturation(image, factor), atol=1e-6)
  for shift in (-0.5, -0.17, 0.0, 0.3):
    np.testing.assert_allclose(da.adjust_hue(image, shift), _np_hue(image, shift), atol=2e-6)
  # Contrast 0 is the flat mean grey; saturation 0 (and grayscale) the luma.
  np.testing.assert_allclose(da.adjust_contrast(image, 0.0),
                             np.full_like(image, _np_luma(image).mean()), atol=1e-6)
  gray = np.repeat(_np_luma(image)[..., None], channels, axis=-1)
  np.testing.assert_allclose(da.to_grayscale(image), gray, atol=1e-6)
  np.testing.assert_allclose(da.grayscale(jax.random.key(0), image, 1.0), gray, atol=1e-6)
  if channels == 3:
    np.testing.assert_allclose(da.adjust_saturation(image, 0.0), gray, atol=1e-6)


def test_hsv_round_trip_and_greys():
  rgb = np.concatenate([_image((50, 3), seed=4), [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5],
                                                 [1, 0, 0], [0.2, 0.9, 0.2]]]).astype(np.float32)
  hsv = np.asarray(da.rgb_to_hsv(rgb))
  np.testing.assert_allclose(hsv, [colorsys.rgb_to_hsv(*p) for p in rgb], atol=1e-6)
  np.testing.assert_allclose(da.hsv_to_rgb(hsv), rgb, atol=1e-6)


@functools.partial(jax.jit, static_argnums=2)
def _jitter_many(keys, image, strengths):
  jitter = functools.partial(da.color_jitter, p=0.8)
  # color_jitter draws the coin from the first half of its key, the rest from the second.
  params_keys = jax.vmap(lambda k: jax.random.split(k)[1])(keys)
  params = jax.vmap(lambda k: da.color_jitter_params(k, *strengths))(params_keys)
  return jax.vmap(lambda k: jitter(k, image, *strengths))(keys), params


@pytest.mark.parametrize('strengths', [(0.4, 0.4, 0.2, 0.1), (0.5, 0.0, 0.5, 0.0)])
def test_color_jitter_is_the_torchvision_ops_in_the_sampled_order(strengths):
  image = _image((4, 5, 3), seed=5)
  out, (orders, params) = jax.device_get(_jitter_many(_keys(2000), image, strengths))
  # Factors ~ U[1 - x, 1 + x], hue shift ~ U[-x, x]: ranges and means.
  strengths = np.array(strengths)
  lows, highs = np.array([1, 1, 1, 0]) - strengths, np.array([1, 1, 1, 0]) + strengths
  assert (params >= lows).all() and (params <= highs).all()
  np.testing.assert_allclose(params.mean(0), (lows + highs) / 2, atol=0.01)
  # All 24 orders appear, each about 1/24 of the time (83 +- 9 expected).
  counts = {tuple(o): 0 for o in itertools.permutations(range(4))}
  for order in orders:
    counts[tuple(order)] += 1
  assert len(counts) == 24 and 40 < min(counts.values()) and max(counts.values()) < 130
  # p = 0.8: the rest are untouched (a jittered image is never exactly the input).
  changed = np.abs(out - image).max(axis=(1, 2, 3)) > 0
  assert abs(changed.mean() - 0.8) < 0.04  # sd 0.009
  np.testing.assert_array_equal(out[~changed], np.broadcast_to(image, out[~changed].shape))
  # The jittered ones are the NumPy ops in the sampled order (ops of strength 0 skipped).
  for i in np.flatnonzero(changed)[:40]:
    want = image
    for op in orders[i]:
      if strengths[op] > 0:
        want = NP_OPS[op](want, params[i, op])
    np.testing.assert_allclose(out[i], want, atol=1e-5)


def test_jitter_saturation_and_hue_are_no_ops_on_one_channel():
  image = _image((4, 5, 1), seed=6)
  np.testing.assert_array_equal(
      da.color_jitter(jax.random.key(1), image, saturation=0.8, hue=0.2), image)


# --------------------------------------------------------- blur and solarize ---


_blur = jax.jit(da.blur, static_argnums=2)


def test_blur():
  kernel = np.asarray(da.gaussian_kernel(1.3, 7))
  x = np.arange(-3, 4)
  np.testing.assert_allclose(kernel, np.exp(-x**2 / (2 * 1.3**2)) / np.exp(-x**2 / 3.38).sum(),
                             rtol=1e-6)
  assert da.gaussian_kernel(1.0, 22).shape == (23,)  # even sizes grow by one, as in SimCLR
  np.testing.assert_allclose(da.gaussian_kernel(2.0, 5).sum(), 1.0, rtol=1e-6)
  image = _image((12, 10, 3), seed=7)
  np.testing.assert_allclose(_blur(image, 0.05, 5), image, atol=1e-6)  # tiny sigma
  np.testing.assert_allclose(_blur(np.full((12, 10, 1), 0.3, np.float32), 2.0, 5), 0.3,
                             atol=1e-6)
  # Against a NumPy separable convolution with reflect padding.
  k = np.asarray(da.gaussian_kernel(1.5, 5))
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)), mode='reflect')
  rows = sum(k[t] * padded[t:t + 12] for t in range(5))
  want = sum(k[t] * rows[:, t:t + 10] for t in range(5))
  np.testing.assert_allclose(_blur(image, 1.5, 5), want, atol=1e-6)
  assert _blur(_image((40, 40, 1)), 1.0).shape == (40, 40, 1)  # default kernel: 40 // 10


def test_solarize():
  image = np.array([0.0, 0.2, 0.4999, 0.5, 0.7, 1.0], np.float32).reshape(1, 6, 1)
  want = np.where(image >= 0.5, 1 - image, image)  # PIL ImageOps.solarize: >= threshold
  np.testing.assert_array_equal(da.solarize(jax.random.key(0), image, 1.0), want)


# --------------------------------------------------- probabilities, views, batches ---


@jax.jit
def _application_rates(keys, image):
  ops = {'flip': lambda k, x, p: dc.horizontal_flip(k, x, p),
         'grayscale': lambda k, x, p: da.grayscale(k, x, p),
         'blur': lambda k, x, p: da.gaussian_blur(k, x, p, (1.0, 2.0), kernel_size=3),
         'solarize': lambda k, x, p: da.solarize(k, x, p),
         'jitter': lambda k, x, p: da.color_jitter(k, x, 0.4, 0.4, 0.4, 0.1, p)}
  rates = {}
  for name, op in ops.items():
    for p in (0.0, 0.8, 1.0):
      out = jax.vmap(op, (0, None, None))(keys, image, p)
      rates[name, p] = jnp.mean(jnp.any(out != image, axis=(1, 2, 3)))
  return rates


def test_application_probabilities():
  image = jnp.asarray(_image((4, 4, 3), seed=8))  # every op changes this image
  rates = jax.device_get(_application_rates(_keys(2000), image))
  for (name, p), rate in rates.items():
    tolerance = 0.04 if p == 0.8 else 0.0  # sd 0.009
    assert abs(rate - p) <= tolerance, (name, p, rate)


@functools.partial(jax.jit, static_argnums=2)
def _views(key, images, blur_prob):
  return da.augment_batch(key, images, dc.simclr_view, size=12, blur_prob=blur_prob)


@functools.partial(jax.jit, static_argnums=2)
def _one_view(key, image, blur_prob):
  return dc.simclr_view(key, image.astype(jnp.float32) / 255, size=12, blur_prob=blur_prob)


@pytest.mark.parametrize('channels', [1, 3])
def test_views_are_deterministic_and_batches_equal_single_images(channels):
  images = np.random.default_rng(9).integers(0, 256, (8, 16, 20, channels), dtype=np.uint8)
  key = jax.random.key(3)
  a, b = _views(key, images, 0.5), _views(key, images, 0.5)
  assert a.shape == (8, 12, 12, channels) and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)  # same key, bitwise the same views
  assert float(a.min()) >= 0 and float(a.max()) <= 1
  other = _views(jax.random.key(4), images, 0.5)  # the second view of the same images
  assert (np.abs(a - other).max(axis=(1, 2, 3)) > 0.01).all()
  if channels == 3:  # one program per test: the single-image check runs once
    for i, k in enumerate(jax.random.split(key, 8)):
      np.testing.assert_allclose(a[i], _one_view(k, images[i], 0.5), atol=1e-6)


def test_sharded_batch_gives_the_single_device_views():
  # In the train step the batch is sharded over devices; the views must not
  # depend on the layout (jax_threefry_partitionable keeps the random bits),
  # only the float rounding of differently sized per-device programs may.
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  images = np.random.default_rng(10).integers(0, 256, (8, 16, 20, 3), dtype=np.uint8)
  single = _views(jax.random.key(5), images, 0.5)  # the program of the test above
  sharded_images = jax.device_put(images, jax.sharding.NamedSharding(mesh, P('data')))
  sharded = _views(jax.random.key(5), sharded_images, 0.5)
  assert sharded.sharding.spec == P('data')
  np.testing.assert_allclose(sharded, single, atol=1e-5)  # per-device batch sizes differ


@jax.jit
def _coloured_views(key, views):
  return da.augment_views(key, views, da.simclr_colour, blur_prob=0.5)


def test_host_views_get_one_key_per_view_and_example():
  # SimCLR's device step: view v of example b is coloured with split(split(key, V)[v], B)[b].
  views = np.random.default_rng(11).integers(0, 256, (4, 2, 12, 12, 3), dtype=np.uint8)
  key = jax.random.key(6)
  got = np.asarray(_coloured_views(key, views))
  assert got.shape == (4, 2, 12, 12, 3)
  for v, view_key in enumerate(jax.random.split(key, 2)):
    for b, example_key in enumerate(jax.random.split(view_key, 4)):
      want = da.simclr_colour(example_key, jnp.asarray(views[b, v], jnp.float32) / 255,
                              blur_prob=0.5)
      np.testing.assert_allclose(got[b, v], np.asarray(want), atol=1e-6)
  # The two views of an image differ (own keys), and no view is cropped or moved:
  # with colour off the host's pixels pass through.
  assert (np.abs(got[:, 0] - got[:, 1]).max(axis=(1, 2, 3)) > 0.01).all()
  plain = da.augment_views(key, views, da.simclr_colour, jitter_prob=0.0, grayscale_prob=0.0,
                           blur_prob=0.0)
  np.testing.assert_allclose(np.asarray(plain), views / 255, atol=1e-6)
