"""Image sources (digits, npz, folder, tfds), checked against known numbers."""

import io
import pickle
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ssl_jax.data import pipeline
from ssl_jax.data.images import open_image_source
from ssl_jax.data.tfds_source import parse_tfds_spec
from ssl_jax.errors import DataError
from tests.data_fixtures import data_config

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


def test_tfds_spec_parsing_shared_by_image_and_text_sources():
  assert parse_tfds_spec('mnist', 'tfds:mnist') == ('mnist', 'train')
  assert parse_tfds_spec('imagenet2012/subset:5.1.0:train[:99%]', 's') == (
      'imagenet2012/subset:5.1.0', 'train[:99%]')
  assert parse_tfds_spec('wikipedia/20230601.en:train[:5%]', 's') == (
      'wikipedia/20230601.en', 'train[:5%]')
  with pytest.raises(DataError, match=r'tfds:\[x\]: expected tfds:NAME\[:SPLIT\]'):
    parse_tfds_spec('[x]', 'tfds:[x]')


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
