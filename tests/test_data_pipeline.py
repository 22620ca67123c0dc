"""Augmentations and grain pipelines: determinism, exact resume, process shares, eval padding."""

import math

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from ssl_jax.data import augment, pipeline
from ssl_jax.errors import DataError
from tests.data_fixtures import assert_batches_equal, data_config, take

# ------------------------------------------------------------ augmentations ---


def test_random_resized_crop_shape_and_determinism():
  image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  a = augment.random_resized_crop(image, np.random.default_rng(5), 16)
  b = augment.random_resized_crop(image, np.random.default_rng(5), 16)
  assert a.shape == (16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  gray = augment.random_resized_crop(image[..., :1], np.random.default_rng(5), 9)
  assert gray.shape == (9, 9, 1)


def test_random_resized_crop_cuts_the_sampled_box():
  # Crop size == output size makes the resize exact, so pixels must be the box.
  image = np.random.default_rng(0).integers(0, 256, (20, 20, 1), dtype=np.uint8)
  for seed in range(50):
    top, left, h, w = augment.random_resized_crop_box(
        20, 20, np.random.default_rng(seed), scale=(0.25, 0.25), ratio=(1, 1))
    assert (h, w) == (10, 10)
    crop = augment.random_resized_crop(image, np.random.default_rng(seed), 10,
                                       scale=(0.25, 0.25), ratio=(1, 1))
    np.testing.assert_array_equal(crop, image[top:top + 10, left:left + 10])


@pytest.mark.parametrize('interpolation,pil_filter', [
    ('bilinear', Image.Resampling.BILINEAR), ('bicubic', Image.Resampling.BICUBIC)])
def test_random_resized_crop_resamples_the_box_with_the_named_filter(interpolation, pil_filter):
  image = np.random.default_rng(1).integers(0, 256, (30, 24, 3), dtype=np.uint8)
  top, left, h, w = augment.random_resized_crop_box(30, 24, np.random.default_rng(3))
  want = Image.fromarray(image[top:top + h, left:left + w]).resize((16, 16), pil_filter)
  got = augment.random_resized_crop(image, np.random.default_rng(3), 16,
                                    interpolation=interpolation)
  np.testing.assert_array_equal(got, np.asarray(want))


def test_unknown_interpolation_is_a_config_error():
  with pytest.raises(DataError, match="config.data.interpolation='nearest'"):
    pipeline.train_dataset(data_config(interpolation='nearest'), seed=0)


def test_random_resized_crop_box_statistics():
  rng = np.random.default_rng(0)
  # Every try fits a 400x400 image here, so area ~ U(0.1, 0.3), log ratio ~ U(log .5, log 2).
  boxes = np.array([augment.random_resized_crop_box(400, 400, rng, (0.1, 0.3), (0.5, 2.0))
                    for _ in range(4000)])
  tops, lefts, hs, ws = boxes.T
  area = hs * ws / 400**2
  assert area.min() > 0.1 - 0.005 and area.max() < 0.3 + 0.005  # rounding slack
  assert abs(area.mean() - 0.2) < 0.005  # uniform mean, sd of the mean 0.0009
  log_ratio = np.log(ws / hs)
  assert log_ratio.min() > math.log(0.5) - 0.02 and log_ratio.max() < math.log(2) + 0.02
  assert abs(log_ratio.mean()) < 0.02 and abs(np.std(log_ratio) - math.log(4) / 12**0.5) < 0.02
  assert (tops + hs <= 400).all() and (lefts + ws <= 400).all() and tops.min() == 0
  # Default scale: with rejection, accepted areas still lie in [0.08, 1].
  boxes = np.array([augment.random_resized_crop_box(64, 48, rng) for _ in range(2000)])
  area = boxes[:, 2] * boxes[:, 3] / (64 * 48)
  assert area.min() >= 0.075 and area.max() <= 1.0


def test_random_resized_crop_fallback_is_torchvision_center_crop():
  # A 10x40 strip cannot hold a 20x20 square: torchvision falls back to the
  # centered box of height 10 and the largest allowed ratio, 1:1.
  box = augment.random_resized_crop_box(10, 40, np.random.default_rng(0), (1, 1), (1, 1))
  assert box == (0, 15, 10, 10)
  box = augment.random_resized_crop_box(40, 10, np.random.default_rng(0), (1, 1), (0.5, 1))
  assert box == (10, 0, 20, 10)  # too tall: h = round(10 / 0.5), top = (40 - 20) // 2
  box = augment.random_resized_crop_box(41, 11, np.random.default_rng(0), (1, 1), (0.5, 1))
  assert box == (9, 0, 22, 11)  # h = round(11 / 0.5) = 22, top = (41 - 22) // 2 = 9


def test_horizontal_flip_probability():
  image = np.arange(12, dtype=np.uint8).reshape(2, 6, 1)
  rng = np.random.default_rng(0)
  flips = [not np.array_equal(augment.horizontal_flip(image, rng), image) for _ in range(4000)]
  assert abs(np.mean(flips) - 0.5) < 0.03  # 4 standard deviations
  np.testing.assert_array_equal(augment.horizontal_flip(image, rng, p=1.0), image[:, ::-1])
  assert augment.horizontal_flip(image, rng, p=0.0) is image


def test_center_crop_resize_centres_the_crop():
  image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
  # Shorter side round(28 / 0.875) = 32 already: no resize, crop rows 2..30, cols 10..38.
  np.testing.assert_array_equal(augment.center_crop_resize(image, 28), image[2:30, 10:38])
  # crop_fraction 1: the shorter side becomes `size`, the longer one is center-cropped.
  np.testing.assert_array_equal(augment.center_crop_resize(image, 32, 1.0), image[:, 8:40])
  tall = augment.center_crop_resize(image.transpose(1, 0, 2)[..., :1], 20)
  assert tall.shape == (20, 20, 1)
  with pytest.raises(ValueError, match='crop_fraction'):
    augment.center_crop_resize(image, 28, 1.5)


def test_to_channels():
  rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
  luma = augment.to_channels(rgb, 1)
  assert luma.shape == (5, 6, 1)
  pillow = np.asarray(Image.fromarray(rgb).convert('L'))  # Pillow uses the same BT.601 weights
  assert np.abs(luma[..., 0].astype(int) - pillow).max() <= 1
  np.testing.assert_array_equal(augment.to_channels(luma, 3), np.repeat(luma, 3, axis=-1))
  assert augment.to_channels(rgb, 3) is rgb
  with pytest.raises(ValueError, match='3 channels to 2'):
    augment.to_channels(rgb, 2)


# ---------------------------------------------------------------- pipelines ---


@pytest.mark.parametrize('channels', [1, 3])
def test_train_batches_shapes_and_dtypes(channels):
  stream, source = pipeline.train_dataset(data_config(channels=channels), seed=0)
  assert len(source) == 1437
  batch = next(iter(stream))
  assert batch['image'].shape == (32, 12, 12, channels) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  assert batch['image'].max() > 200 and set(batch['label']) <= set(range(10))
  summary = pipeline.describe_train(data_config(), source)
  assert 'digits:train (1437 images, 10 classes)' in summary and 'batch 32 = 32 x 1' in summary


def test_same_seed_same_stream_other_seed_other_stream():
  stream = pipeline.train_dataset(data_config(), seed=3)[0]
  assert iter(stream) is iter(stream)  # grain's ElasticIterator: one iterator per dataset
  first = take(iter(stream), 4)
  again = take(iter(pipeline.train_dataset(data_config(prefetch=0), seed=3)[0]), 4)
  assert_batches_equal(first, again)  # prefetch threads do not change the stream
  other = take(iter(pipeline.train_dataset(data_config(), seed=4)[0]), 1)
  assert not np.array_equal(first[0]['label'], other[0]['label'])


def test_epochs_are_reshuffled_permutations(indexed_npz):
  spec, _ = indexed_npz
  stream, _ = pipeline.train_dataset(data_config(source=spec, batch_size=20), seed=0)
  labels = np.concatenate([b['label'] for b in take(iter(stream), 10)])
  epoch0, epoch1 = labels[:100], labels[100:]
  assert sorted(epoch0) == list(range(100)) and sorted(epoch1) == list(range(100))
  assert not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_resume_from_get_state_is_exact(num_workers):
  iterator = iter(pipeline.train_dataset(data_config(num_workers=num_workers), seed=0)[0])
  take(iterator, 7)
  state = iterator.get_state()
  tail = take(iterator, 5)
  iterator.close()
  resumed = iter(pipeline.train_dataset(data_config(num_workers=num_workers), seed=0)[0])
  resumed.set_state(state)
  # The state is a position in the global stream, so it also restores into
  # the other worker count: worker processes assemble the very same batches.
  other = iter(pipeline.train_dataset(data_config(num_workers=2 - num_workers), seed=0)[0])
  other.set_state(state)
  try:
    assert_batches_equal(take(resumed, 5), tail)
    assert_batches_equal(take(other, 5), tail)
  finally:
    resumed.close()
    other.close()


@pytest.mark.parametrize('num_workers', [0, 2])
def test_resume_through_an_orbax_checkpoint(tmp_path, num_workers):
  data = data_config(hflip=False, channels=3, num_workers=num_workers)
  iterator = iter(pipeline.train_dataset(data, seed=1)[0])
  take(iterator, 7)
  manager = ocp.CheckpointManager(tmp_path / 'checkpoints',
                                  options=ocp.CheckpointManagerOptions(max_to_keep=2))
  manager.save(7, args=ocp.args.Composite(
      state=ocp.args.StandardSave({'step': np.array(7)}),
      data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  tail = take(iterator, 5)
  iterator.close()
  manager.close()

  resumed = iter(pipeline.train_dataset(data, seed=1)[0])
  manager = ocp.CheckpointManager(tmp_path / 'checkpoints')
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore({'step': np.array(0)}),
      data=grain.checkpoint.CheckpointRestore(resumed)))
  manager.close()
  assert restored['state']['step'] == 7
  assert_batches_equal(take(resumed, 5), tail)
  resumed.close()


def test_process_shares_are_disjoint_and_sum_to_the_global_batch(indexed_npz):
  spec, images = indexed_npz
  data = data_config(source=spec, batch_size=10, channels=3)
  single = take(iter(pipeline.train_dataset(data, seed=2)[0]), 10)  # one epoch
  shares = [take(iter(pipeline.train_dataset(data, seed=2, process_index=p, process_count=2)[0]),
                 10) for p in (0, 1)]
  seen = [np.concatenate([b['label'] for b in share]) for share in shares]
  assert shares[0][0]['image'].shape == (5, 12, 12, 3)
  assert not set(seen[0]) & set(seen[1])  # disjoint within the epoch
  assert sorted(np.concatenate(seen)) == list(range(100))

  def assert_same_global_batch(halves, whole):  # same images and crops, any order
    labels = np.concatenate([h['label'] for h in halves])
    images = np.concatenate([h['image'] for h in halves])
    np.testing.assert_array_equal(np.sort(labels), np.sort(whole['label']))
    np.testing.assert_array_equal(images[np.argsort(labels)],
                                  whole['image'][np.argsort(whole['label'])])

  for k in range(10):
    assert_same_global_batch([shares[0][k], shares[1][k]], single[k])
  # A one-process checkpoint restores into two processes at the same global batch.
  iterator = iter(pipeline.train_dataset(data, seed=2)[0])
  take(iterator, 3)
  halves = []
  for p in (0, 1):
    half = iter(pipeline.train_dataset(data, seed=2, process_index=p, process_count=2)[0])
    half.set_state(iterator.get_state())
    halves.append(next(half))
  assert_same_global_batch(halves, single[3])


def test_startup_errors_happen_at_call_time(tmp_path, indexed_npz):
  spec, _ = indexed_npz
  with pytest.raises(DataError, match='batch_size=30 must be a positive multiple .* 4'):
    pipeline.train_dataset(data_config(batch_size=30), seed=0, process_count=4)
  with pytest.raises(DataError, match='has 100 images, fewer than one global batch .*=128'):
    pipeline.train_dataset(data_config(source=spec, batch_size=128), seed=0, process_count=2)
  with pytest.raises(DataError, match='no such directory'):
    pipeline.train_dataset(data_config(source=f'folder:{tmp_path}/none'), seed=0)
  with pytest.raises(DataError, match=r'config.data.channels=2; expected 1 or 3'):
    pipeline.train_dataset(data_config(channels=2), seed=0)
  with pytest.raises(DataError, match=r'config.data.crop_scale'):
    pipeline.train_dataset(data_config(crop_scale=(0.5, 0.2)), seed=0)
  with pytest.raises(DataError, match='seed=-1'):
    pipeline.train_dataset(data_config(), seed=-1)


def test_eval_batches_pad_to_equal_counts_across_processes(indexed_npz):
  spec, images = indexed_npz
  data = data_config(image_size=10, channels=3)
  assert pipeline.eval_source_size(data, spec) == 100
  # 100 examples over 3 processes: shares 34, 33, 33; 4 per batch -> 9 batches each.
  runs = [pipeline.eval_batches(data, spec, batch_size=12, process_index=p, process_count=3)
          for p in range(3)]
  assert [len(run) for run in runs] == [9, 9, 9] and runs[0].num_examples == 100
  batches = [list(run) for run in runs]
  assert [len(b) for b in batches] == [9, 9, 9]
  labels = []
  for p, run in enumerate(batches):
    for batch in run:
      assert batch['image'].shape == (4, 10, 10, 3) and batch['valid'].dtype == np.bool_
      assert batch['label'].dtype == np.int32
    valid = np.concatenate([b['valid'] for b in run])
    label = np.concatenate([b['label'] for b in run])
    image = np.concatenate([b['image'] for b in run])
    assert valid.sum() == (34, 33, 33)[p] and not valid[valid.sum():].any()  # padding at the end
    np.testing.assert_array_equal(label[valid], np.arange(p, 100, 3))  # in order
    assert (label[~valid] == -1).all() and (image[~valid] == 0).all()
    # 10x10 images at image_size 10 and crop fraction 1: pixels pass through unchanged.
    np.testing.assert_array_equal(image[valid], images[p::3])
    labels.append(label[valid])
  assert sorted(np.concatenate(labels)) == list(range(100))
  with pytest.raises(DataError, match='eval batch_size=10 must be a positive multiple'):
    pipeline.eval_batches(data, spec, batch_size=10, process_count=3)


def test_eval_batches_when_a_process_has_no_examples(tmp_path):
  np.savez(tmp_path / 'two.npz', images=np.ones((2, 4, 4), np.uint8), labels=np.array([0, 1]))
  data = data_config(image_size=4)
  runs = [list(pipeline.eval_batches(data, f'npz:{tmp_path}/two.npz', batch_size=6,
                                     process_index=p, process_count=3)) for p in range(3)]
  assert [len(r) for r in runs] == [1, 1, 1]
  assert [int(r[0]['valid'].sum()) for r in runs] == [1, 1, 0]

