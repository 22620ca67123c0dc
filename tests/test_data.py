"""Image sources, augmentations and grain pipelines, checked against known numbers."""

import io
import math
import pickle
import time

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ssl_jax.data import augment, pipeline
from ssl_jax.data.images import DataError, open_image_source

# ------------------------------------------------------------------ helpers ---


def data_config(**overrides) -> ml_collections.ConfigDict:
  """A CPU-sized `config.data` with the keys the real configs define."""
  data = dict(source='digits:train', tfds_dir=None, batch_size=32, image_size=12, channels=1,
              crop_scale=(0.35, 1.0), crop_ratio=(3 / 4, 4 / 3), hflip=True,
              eval_crop_fraction=1.0, num_workers=0, prefetch=2)
  data.update(overrides)
  return ml_collections.ConfigDict(data)


@pytest.fixture
def indexed_npz(tmp_path):
  """100 random 10x10 RGB images whose label is their index: labels name examples."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (100, 10, 10, 3), dtype=np.uint8)
  path = tmp_path / 'indexed.npz'
  np.savez(path, images=images, labels=np.arange(100))
  return f'npz:{path}', images


def take(iterator, n):
  """The next `n` batches."""
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  """Two lists of batches are bitwise equal."""
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# ------------------------------------------------------------------ sources ---


def test_digits_splits_partition_the_1797_images():
  train, test, full = (open_image_source(s) for s in ('digits', 'digits:test', 'digits:all'))
  assert (len(train), len(test), len(full)) == (1437, 360, 1797)
  assert train.name == 'digits:train' and train.num_classes == 10 and train.has_labels
  example = train[0]
  assert example['image'].shape == (8, 8, 1) and example['image'].dtype == np.uint8
  assert example['label'].dtype == np.int32
  pixels = np.stack([full[i]['image'] for i in range(len(full))])
  # 0..16 counts stretched to 0..255: only the 17 values round(k * 255 / 16) occur.
  assert set(np.unique(pixels)) <= {round(k * 255 / 16) for k in range(17)}
  assert pixels.min() == 0 and pixels.max() == 255

  def keyed(source):
    return sorted(source[i]['image'].tobytes() + bytes([source[i]['label']])
                  for i in range(len(source)))

  # Train and test together are exactly the full set: disjoint and complete.
  assert sorted(keyed(train) + keyed(test)) == keyed(full)
  # Seeded: reopening gives the same split.
  np.testing.assert_array_equal(open_image_source('digits:test')[7]['image'], test[7]['image'])


def test_unknown_specs_list_the_accepted_forms():
  with pytest.raises(DataError, match='digits:train, digits:test'):
    open_image_source('digits:val')
  with pytest.raises(DataError, match=r'npz:PATH.*folder:PATH.*tfds:NAME'):
    open_image_source('imagenet')


def test_npz_sources_both_layouts(tmp_path):
  gray = np.arange(5 * 4 * 6, dtype=np.uint8).reshape(5, 4, 6)
  np.savez(tmp_path / 'gray.npz', images=gray, labels=np.array([0, 2, 1, 2, 0]))
  source = open_image_source(f'npz:{tmp_path}/gray.npz')
  assert len(source) == 5 and source.num_classes == 3 and source.has_labels
  np.testing.assert_array_equal(source[3]['image'], gray[3][..., None])
  assert source[1]['label'] == 2 and source[1]['label'].dtype == np.int32

  rgb = np.random.default_rng(0).integers(0, 256, (3, 7, 5, 3)).astype(np.int64)
  np.savez_compressed(tmp_path / 'rgb.npz', images=rgb)  # int64 in 0..255 is accepted.
  source = open_image_source(f'npz:{tmp_path}/rgb.npz')
  assert source.num_classes is None and not source.has_labels
  assert source[2]['label'] == -1
  assert source[2]['image'].dtype == np.uint8
  np.testing.assert_array_equal(source[2]['image'], rgb[2])


def test_npz_is_memory_mapped_and_pickles_as_its_path(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (200, 16, 16, 3), dtype=np.uint8)
  np.savez(tmp_path / 'big.npz', images=images)
  source = open_image_source(f'npz:{tmp_path}/big.npz')
  blob = pickle.dumps(source)
  # 150 KB of pixels, but grain's workers receive only the path and re-map it.
  assert len(blob) < 2000
  clone = pickle.loads(blob)
  np.testing.assert_array_equal(clone[199]['image'], images[199])


@pytest.mark.parametrize('arrays, expected', [
    (dict(pixels=np.zeros((2, 4, 4), np.uint8)), r'has arrays \[.pixels.\]; expected `images`'),
    (dict(images=np.zeros((2, 4), np.uint8)), r'shape \(2, 4\); expected \(N,H,W\)'),
    (dict(images=np.zeros((2, 4, 4, 2), np.uint8)), r'shape \(2, 4, 4, 2\).*C 1 or 3'),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(3, np.int64)),
     r'`labels`.*shape \(3,\); expected \(2,\)'),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(2, np.float32)),
     r'`labels`.*float32; expected integers'),
    (dict(images=np.full((2, 4, 4), 300, np.int32)), r'values in 300..300; expected uint8'),
    (dict(images=np.zeros((2, 4, 4), np.float32)), r'dtype float32; expected uint8'),
])
def test_malformed_npz_names_path_and_problem(tmp_path, arrays, expected):
  path = tmp_path / 'bad.npz'
  np.savez(path, **arrays)
  with pytest.raises(DataError, match=expected) as error:
    open_image_source(f'npz:{path}')
  assert str(path) in str(error.value)


def test_npz_missing_or_not_an_archive(tmp_path):
  with pytest.raises(DataError, match='no such file'):
    open_image_source(f'npz:{tmp_path}/absent.npz')
  (tmp_path / 'text.npz').write_text('not numpy')
  with pytest.raises(DataError, match='not a readable .npz'):
    open_image_source(f'npz:{tmp_path}/text.npz')


def write_png(path, pixels):
  """Saves uint8 pixels as a PNG, creating the folder."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path)


def test_folder_source_decodes_lazily_to_rgb(tmp_path):
  root = tmp_path / 'train'
  red = np.zeros((6, 9, 3), np.uint8)
  red[..., 0] = 200
  write_png(root / 'cat' / 'b.png', red)
  write_png(root / 'cat' / 'a.png', np.full((5, 5, 3), 10, np.uint8))
  write_png(root / 'ant' / 'x.png', np.full((4, 7), 77, np.uint8))  # grayscale 'L'
  (root / 'ant' / 'notes.txt').write_text('ignored')
  source = open_image_source(f'folder:{root}')
  assert len(source) == 3 and source.num_classes == 2  # classes sorted: ant=0, cat=1
  assert [int(source[i]['label']) for i in range(3)] == [0, 1, 1]
  gray = source[0]['image']
  assert gray.shape == (4, 7, 3) and (gray == 77).all()  # always RGB
  np.testing.assert_array_equal(source[1]['image'], np.full((5, 5, 3), 10))  # a.png < b.png
  np.testing.assert_array_equal(source[2]['image'], red)

  (root / 'cat' / 'c.png').write_bytes(b'broken')
  with pytest.raises(DataError, match='cannot decode image .*c.png'):
    open_image_source(f'folder:{root}')[3]


def test_folder_errors_name_the_path(tmp_path):
  with pytest.raises(DataError, match=f'no such directory .*{tmp_path}/nope'):
    open_image_source(f'folder:{tmp_path}/nope')
  (tmp_path / 'flat').mkdir()
  (tmp_path / 'flat' / 'x.png').write_bytes(b'')
  with pytest.raises(DataError, match=f'{tmp_path}/flat.* has no class sub-folders'):
    open_image_source(f'folder:{tmp_path}/flat')
  (tmp_path / 'empty' / 'a').mkdir(parents=True)
  (tmp_path / 'empty' / 'b').mkdir()
  with pytest.raises(DataError, match=f'2 class folders of .*{tmp_path}/empty.* hold no image'):
    open_image_source(f'folder:{tmp_path}/empty')


# --------------------------------------------------------------------- tfds ---


def test_tfds_unprepared_fails_fast_naming_the_data_dir(tmp_path):
  start = time.perf_counter()
  with pytest.raises(DataError) as error:
    open_image_source('tfds:imagenet2012:validation', tfds_dir=str(tmp_path))
  assert time.perf_counter() - start < 5  # tfds without download=False hangs ~200 s
  message = str(error.value)
  assert f'not prepared in data dir {tmp_path}' in message
  assert f'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org into ' \
         f'{tmp_path}/downloads/manual/' in message
  assert f'tfds build imagenet2012 --data_dir={tmp_path} --file_format=array_record' in message
  assert '--config.data.source=folder:PATH' in message
  with pytest.raises(DataError, match=f'tfds build mnist --data_dir={tmp_path} '):
    open_image_source('tfds:mnist', tfds_dir=str(tmp_path))
  with pytest.raises(DataError, match='TFDS has no dataset named .no_such_dataset_xyz.'):
    open_image_source('tfds:no_such_dataset_xyz', tfds_dir=str(tmp_path))


class SslJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """A 7-image TFDS dataset built without TensorFlow (PNG bytes from Pillow)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(6, 5, 3)),
        'label': tfds.features.ClassLabel(num_classes=4)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(range(5)),
            'test': self._generate_examples(range(5, 7))}

  def _generate_examples(self, indices):
    for i in indices:
      png = io.BytesIO()
      Image.fromarray(np.full((6, 5, 3), 30 * i, np.uint8)).save(png, format='PNG')
      yield i, {'image': png.getvalue(), 'label': i % 4}


@pytest.fixture(scope='module')
def tiny_tfds_dir(tmp_path_factory):
  """A data dir with SslJaxTinyImages prepared as array_record."""
  data_dir = tmp_path_factory.mktemp('tfds')
  SslJaxTinyImages(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return str(data_dir)


def test_tfds_prepared_array_record_dataset(tiny_tfds_dir):
  source = open_image_source('tfds:ssl_jax_tiny_images:test', tfds_dir=tiny_tfds_dir)
  assert len(source) == 2 and source.num_classes == 4 and source.has_labels
  seen = {}
  for i in range(2):
    example = source[i]
    assert example['image'].shape == (6, 5, 3) and example['image'].dtype == np.uint8
    seen[int(example['image'][0, 0, 0]) // 30] = int(example['label'])
  assert seen == {5: 1, 6: 2}  # image i has label i % 4
  assert len(open_image_source('tfds:ssl_jax_tiny_images:train[:60%]',
                               tfds_dir=tiny_tfds_dir)) == 3
  with pytest.raises(DataError, match="bad split 'valid'"):
    open_image_source('tfds:ssl_jax_tiny_images:valid', tfds_dir=tiny_tfds_dir)
  stream, _ = pipeline.train_dataset(
      data_config(source='tfds:ssl_jax_tiny_images', tfds_dir=tiny_tfds_dir, batch_size=4,
                  channels=3), seed=0)
  batch = next(iter(stream))
  assert batch['image'].shape == (4, 12, 12, 3) and set(batch['label']) <= {0, 1, 2, 3}


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
