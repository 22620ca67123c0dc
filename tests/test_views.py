"""SimCLR's and DINO's views: cut by the host from the WHOLE image, coloured on device."""

import jax
import numpy as np
import pytest
from PIL import Image

from configs import dino_vit, simclr_resnet
from ssl_jax import methods
from ssl_jax.data import augment, pipeline
from ssl_jax.errors import ConfigError
from tests.data_fixtures import assert_batches_equal, take

GREY, RED, BLUE = (128, 128, 128), (255, 0, 0), (0, 0, 255)


def banded_image() -> np.ndarray:
  """A 4:3 photo, 24x32: grey, with a red band in its left eighth and a blue one in its right.

  The two bands are the quarter of the picture a center square never shows.
  """
  image = np.empty((24, 32, 3), np.uint8)
  image[:] = GREY
  image[:, :4] = RED
  image[:, 28:] = BLUE
  return image


@pytest.fixture
def banded_npz(tmp_path):
  """16 copies of the banded image, labelled by index."""
  path = tmp_path / 'banded.npz'
  np.savez(path, images=np.stack([banded_image()] * 16), labels=np.arange(16))
  return f'npz:{path}'


def simclr_config(source: str, batch_size: int = 16):
  """The paper recipe's views (scale 0.08-1, bicubic) at 16 px on a small source."""
  config = simclr_resnet.get_config()
  config.data.update(dict(source=source, batch_size=batch_size, image_size=16, num_workers=0))
  config.augment.size = 16
  return config


def dino_config(source: str, batch_size: int = 16):
  """The paper recipe's multi-crop (global 0.4-1, local 0.05-0.4, bicubic) at 16 and 8 px."""
  config = dino_vit.get_config()
  config.data.update(dict(source=source, batch_size=batch_size, image_size=16, num_workers=0))
  config.augment.update(dict(global_size=16, local_size=8, num_local_crops=3))
  return config


def train_stream(config, **process):
  views = methods.create(config).view_specs(config)
  return pipeline.train_dataset(config.data, seed=config.seed, views=views, **process)[0]


def shows(views: np.ndarray, colour) -> np.ndarray:
  """(..., H, W, 3) views -> (...) whether some pixel is (nearly) exactly `colour`."""
  close = np.abs(views.astype(int) - np.array(colour)).max(axis=-1) <= 24
  return close.any(axis=(-2, -1))


@pytest.mark.parametrize('method', ['simclr', 'dino'])
def test_views_come_from_the_whole_image(banded_npz, method):
  config = (simclr_config if method == 'simclr' else dino_config)(banded_npz)
  batches = take(iter(train_stream(config)), 4)  # 64 images
  names = ['views'] if method == 'simclr' else ['global_views', 'local_views']
  for name in names:
    views = np.concatenate([b[name] for b in batches])  # (64, V, S, S, 3)
    # A center square (cols 4..27) holds neither band; crops of the whole photo
    # reach its edges often: each band in 15% (local crops) to 40% of the views.
    red, blue = shows(views, RED).mean(), shows(views, BLUE).mean()
    assert red > 0.1 and blue > 0.1, (name, red, blue)
    assert shows(views, GREY).mean() > 0.5, name
    # Both bands within one view: only a crop nearly as wide as the photo, which
    # the scale and ratio allow for global crops and never for local ones.
    both = (shows(views, RED) & shows(views, BLUE)).mean()
    assert both < 0.3 if name != 'local_views' else both == 0, (name, both)


def test_simclr_and_dino_batches_have_the_configured_views(banded_npz):
  batch = next(iter(train_stream(simclr_config(banded_npz, batch_size=8))))
  assert batch.keys() == {'views', 'label'}
  assert batch['views'].shape == (8, 2, 16, 16, 3) and batch['views'].dtype == np.uint8
  config = dino_config(banded_npz, batch_size=8)
  config.augment.update(dict(global_size=24, local_size=12, num_local_crops=5))
  batch = next(iter(train_stream(config)))
  assert batch.keys() == {'global_views', 'local_views', 'label'}
  assert batch['global_views'].shape == (8, 2, 24, 24, 3)
  assert batch['local_views'].shape == (8, 5, 12, 12, 3)
  assert batch['local_views'].dtype == np.uint8
  config.augment.num_local_crops = 0  # Global crops only.
  assert next(iter(train_stream(config))).keys() == {'global_views', 'label'}
  # The :local recipes on the 8x8 digits, one channel.
  local = simclr_resnet.get_config('local')
  local.data.batch_size = 4
  assert next(iter(train_stream(local)))['views'].shape == (4, 2, 8, 8, 1)
  local = dino_vit.get_config('local')
  local.data.batch_size = 4
  batch = next(iter(train_stream(local)))
  assert batch['global_views'].shape == (4, 2, 16, 16, 1)
  assert batch['local_views'].shape == (4, 4, 8, 8, 1)


def test_each_view_is_a_torchvision_crop_of_the_whole_image_then_a_flip():
  image = np.random.default_rng(0).integers(0, 256, (24, 32, 3), np.uint8)
  specs = (pipeline.ViewSpec('a', 2, 16, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 'bicubic'),
           pipeline.ViewSpec('b', 3, 8, (0.05, 0.4), (3 / 4, 4 / 3), 0.5, 'bicubic'))
  out = pipeline.MultiViewTransform(specs, 3).random_map(
      {'image': image, 'label': np.int32(3)}, np.random.default_rng(7))
  rng = np.random.default_rng(7)  # The same draws, one view after the other.
  for spec in specs:
    for k in range(spec.count):
      top, left, h, w = augment.random_resized_crop_box(24, 32, rng, spec.crop_scale,
                                                        spec.crop_ratio)
      want = np.asarray(Image.fromarray(image[top:top + h, left:left + w]).resize(
          (spec.size, spec.size), Image.Resampling.BICUBIC))
      if rng.random() < 0.5:
        want = want[:, ::-1]
      np.testing.assert_array_equal(out[spec.name][k], want, err_msg=f'{spec.name} {k}')
  # The whole 4:3 image (scale 1, ratio 4:3) is resized once, not center-cropped first.
  whole = pipeline.ViewSpec('whole', 1, 12, (1.0, 1.0), (4 / 3, 4 / 3), 0.0, 'bilinear')
  out = pipeline.MultiViewTransform((whole,), 3).random_map(
      {'image': image, 'label': np.int32(0)}, np.random.default_rng(0))
  np.testing.assert_array_equal(
      out['whole'][0], np.asarray(Image.fromarray(image).resize((12, 12), Image.BILINEAR)))


def test_view_stream_is_deterministic_resumes_exactly_and_ignores_process_count(tmp_path):
  images = np.random.default_rng(1).integers(0, 256, (40, 18, 24, 3), np.uint8)
  np.savez(tmp_path / 'indexed.npz', images=images, labels=np.arange(40))
  config = dino_config(f'npz:{tmp_path}/indexed.npz', batch_size=8)
  iterator = iter(train_stream(config))
  head = take(iterator, 3)
  state = iterator.get_state()
  tail = take(iterator, 4)  # Into the second epoch.
  assert_batches_equal(take(iter(train_stream(config)), 7), head + tail)
  resumed = iter(train_stream(config))
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 4), tail)
  # Two processes: their batch k together holds the very same crops of the same images.
  halves = []
  for p in (0, 1):
    half = iter(train_stream(config, process_index=p, process_count=2))
    half.set_state(state)
    halves.append(take(half, 4))
  for k, whole in enumerate(tail):
    labels = np.concatenate([h[k]['label'] for h in halves])
    order, want = np.argsort(labels), np.argsort(whole['label'])
    np.testing.assert_array_equal(labels[order], whole['label'][want])
    for name in ('global_views', 'local_views'):
      np.testing.assert_array_equal(np.concatenate([h[k][name] for h in halves])[order],
                                    whole[name][want])
  other_seed = config.copy_and_resolve_references()
  other_seed.seed = 1
  assert not np.array_equal(next(iter(train_stream(other_seed)))['global_views'],
                            head[0]['global_views'])


@pytest.mark.parametrize('key,value,named', [
    ('local_crop_scale', (0.5, 0.2), 'config.augment.local_crop_scale=(0.5, 0.2)'),
    ('global_crop_scale', (0.0, 1.0), 'config.augment.global_crop_scale=(0.0, 1.0)'),
    ('num_local_crops', -2, 'config.augment.num_local_crops=-2'),
    ('local_size', 0, 'config.augment.local_size=0'),
    ('flip_prob', 1.5, 'config.augment.flip_prob=1.5'),
    ('crop_ratio', (2.0, 1.0), 'config.augment.crop_ratio=(2.0, 1.0)'),
])
def test_bad_view_config_names_its_key(banded_npz, key, value, named):
  config = dino_config(banded_npz)
  config.augment[key] = value
  with pytest.raises(ConfigError) as error:
    train_stream(config)
  assert named in str(error.value)
  config = simclr_config(banded_npz)
  config.augment.size = -1
  with pytest.raises(ConfigError, match=r'config.augment.size=-1; expected a positive int'):
    train_stream(config)


def test_methods_only_colour_the_host_views_on_device():
  """With every colour op off, the step sees exactly the host's pixels (normalised)."""
  rng = np.random.default_rng(3)
  config = simclr_resnet.get_config('local')
  config.augment.update(dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0))
  views = rng.integers(0, 256, (4, 2, 8, 8, 1), np.uint8)
  got = methods.create(config)._views(views, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(got), (views / 255 - 0.5) / 0.5, atol=1e-6)
  config = dino_vit.get_config('local')
  config.augment.update(dict(jitter_prob=0.0, grayscale_prob=0.0, local_blur_prob=0.0,
                             global_blur_probs=(0.0, 0.0), global_solarize_probs=(0.0, 0.0)))
  batch = {'global_views': rng.integers(0, 256, (4, 2, 16, 16, 1), np.uint8),
           'local_views': rng.integers(0, 256, (4, 4, 8, 8, 1), np.uint8)}
  global_views, local_views = methods.create(config).views(batch, jax.random.key(0))
  for name, got in (('global_views', global_views), ('local_views', local_views)):
    np.testing.assert_allclose(np.asarray(got), (batch[name] / 255 - 0.5) / 0.5, atol=1e-6)
