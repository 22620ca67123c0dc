"""Image sources: random-access datasets of uint8 images and integer labels.

Every source follows grain's RandomAccessDataSource protocol (`__len__`,
`__getitem__`) and yields `{'image': uint8 (H, W, C), 'label': int32}`, with
label -1 when the source has no labels. Opening a source is cheap (files are
listed or memory-mapped, never decoded) and fails at once, with a message
naming the source and what was expected, when the data is missing or
malformed.

Accepted specs (`config.data.source`):

  digits[:train|test|all]  scikit-learn's bundled 8x8 digits, (8, 8, 1).
  npz:PATH                 `images` (N,H,W[,C]) uint8 and optional `labels`.
  folder:PATH              PATH/<class>/*.{jpg,jpeg,png}, decoded lazily.
  tfds:NAME[:SPLIT]        a prepared TFDS dataset in array_record format.
"""

from __future__ import annotations

import abc
import os
import struct
import zipfile
from typing import Any

import numpy as np
from PIL import Image

from ssl_jax.data.tfds_source import open_tfds
from ssl_jax.errors import DataError

SPEC_FORMS = (
    'digits[:train|test|all]',
    'npz:PATH',
    'folder:PATH',
    'tfds:NAME[:SPLIT]',
)

# The digits split: a fixed random permutation (numpy seed 0) holds out 360 of
# the 1,797 images (20%, rounded up like sklearn's train_test_split) as test.
DIGITS_SPLIT_SEED = 0
DIGITS_NUM_TEST = 360

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


class ImageSource(abc.ABC):
  """A random-access image dataset (grain RandomAccessDataSource protocol).

  Attributes:
    name: the spec the source was opened with, e.g. 'digits:train'.
    num_classes: number of label classes, or None when there are no labels.
    has_labels: whether `label` holds real labels (else it is always -1).
  """

  def __init__(self, name: str, num_classes: int | None, has_labels: bool | None = None):
    self.name = name
    self.num_classes = num_classes
    self.has_labels = num_classes is not None if has_labels is None else has_labels

  @abc.abstractmethod
  def __len__(self) -> int:
    """Number of images."""

  @abc.abstractmethod
  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """{'image': uint8 (H, W, C), 'label': int32} of image `index`."""

  def __repr__(self) -> str:
    return (f'{type(self).__name__}({self.name!r}, {len(self)} images, '
            f'num_classes={self.num_classes})')


class ArrayImageSource(ImageSource):
  """Images held in (or memory-mapped from) one (N, H, W, C) uint8 array."""

  def __init__(
      self,
      name: str,
      images: np.ndarray,
      labels: np.ndarray | None,
      num_classes: int | None,
      reopen_path: str | None = None,
  ):
    super().__init__(name, num_classes)
    self._images = images  # (N, H, W, C) uint8, possibly an np.memmap
    self._labels = labels  # (N,) int32 or None
    # A memory-mapped source pickles as its path, so grain's worker processes
    # map the file themselves instead of receiving a copy of every image.
    self._reopen_path = reopen_path

  def __reduce__(self):
    if self._reopen_path is not None:
      return (_open_npz, (self._reopen_path, self.name))
    return super().__reduce__()

  def __len__(self) -> int:
    return self._images.shape[0]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    label = -1 if self._labels is None else self._labels[index]
    # np.array copies out of a memmap: the element must not pin the file.
    return {'image': np.array(self._images[index]), 'label': np.int32(label)}


class FolderImageSource(ImageSource):
  """An ImageNet-style folder tree; each image is decoded when it is read."""

  def __init__(self, name: str, paths: list[str], labels: np.ndarray, num_classes: int):
    super().__init__(name, num_classes)
    self._paths = paths
    self._labels = labels

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    path = self._paths[index]
    try:
      with Image.open(path) as image:
        # Always RGB: grayscale and CMYK JPEGs occur in ImageNet itself.
        pixels = np.asarray(image.convert('RGB'), dtype=np.uint8)
    except (OSError, ValueError) as e:
      raise DataError(f'{self.name}: cannot decode image {path}: {e}') from e
    return {'image': pixels, 'label': np.int32(self._labels[index])}


class TfdsImageSource(ImageSource):
  """A TFDS array_record data source with `image` and optional `label`."""

  def __init__(self, name: str, data_source: Any, num_classes: int | None, has_labels: bool):
    super().__init__(name, num_classes, has_labels)
    self._data_source = data_source

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self._data_source[index]
    image = np.asarray(example['image'], dtype=np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    label = example['label'] if self.has_labels else -1
    return {'image': image, 'label': np.int32(label)}


def open_image_source(spec: str, *, tfds_dir: str | None = None) -> ImageSource:
  """Opens the image source named by `spec` (see the module docstring)."""
  kind, _, rest = spec.partition(':')
  if kind == 'digits':
    return _open_digits(rest or 'train')
  if kind == 'npz' and rest:
    return _open_npz(rest, spec)
  if kind == 'folder' and rest:
    return _open_folder(rest, spec)
  if kind == 'tfds' and rest:
    return _open_tfds(rest, spec, tfds_dir)
  raise DataError(f'Unknown image source {spec!r}; expected one of: ' + ', '.join(SPEC_FORMS))


# ----------------------------------------------------------------- digits ---


def _open_digits(split: str) -> ImageSource:
  """scikit-learn's 8x8 digits with a fixed seeded 80/20 train/test split."""
  if split not in ('train', 'test', 'all'):
    raise DataError(f'Unknown digits split {split!r}; expected digits:train, digits:test or '
                    'digits:all')
  # Imported here: sklearn.datasets alone costs ~2 s of startup.
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  # Pixels are counts 0..16 of an original 4x4 block; stretch to 0..255.
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
  if split == 'test':
    keep = np.sort(order[:DIGITS_NUM_TEST])
  elif split == 'train':
    keep = np.sort(order[DIGITS_NUM_TEST:])
  else:
    keep = np.arange(len(images))
  return ArrayImageSource(f'digits:{split}', images[keep], labels[keep], 10)


# -------------------------------------------------------------------- npz ---


def _mmap_npz_member(path: str, member: str) -> np.ndarray | None:
  """Memory-maps an uncompressed array inside an .npz, or returns None."""
  # np.load ignores mmap_mode for .npz archives, but np.savez stores members
  # uncompressed, so the .npy bytes sit contiguously in the zip file.
  with zipfile.ZipFile(path) as archive:
    info = archive.getinfo(member)
  if info.compress_type != zipfile.ZIP_STORED:
    return None
  with open(path, 'rb') as f:
    f.seek(info.header_offset)
    header = f.read(30)  # the fixed part of the zip local file header
    name_len, extra_len = struct.unpack('<HH', header[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
      shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      return None
    offset = f.tell()
  if dtype.hasobject or not shape or 0 in shape:
    return None
  return np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=shape,
                   order='F' if fortran else 'C')


def _open_npz(path: str, name: str) -> ImageSource:
  """Opens and validates an .npz archive of images and optional labels."""
  if not os.path.isfile(path):
    raise DataError(f'{name}: no such file {path!r}; expected a NumPy .npz archive with an '
                    '`images` array')
  try:
    archive = np.load(path, allow_pickle=False)
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise DataError(f'{name}: {path!r} is not a readable .npz archive: {e}') from e
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise DataError(f'{name}: {path!r} holds a single array; expected an .npz archive '
                    '(np.savez) with an `images` array')
  with archive:
    if 'images' not in archive.files:
      raise DataError(f'{name}: {path!r} has arrays {archive.files}; expected `images` '
                      '(N,H,W,C) or (N,H,W) uint8 and optional `labels` (N,)')
    try:
      images = _mmap_npz_member(path, 'images.npy')
      mapped = images is not None
      if not mapped:
        images = archive['images']
      labels = archive['labels'] if 'labels' in archive.files else None
    except (OSError, ValueError, KeyError) as e:
      raise DataError(f'{name}: cannot read arrays from {path!r}: {e}') from e

  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise DataError(f'{name}: `images` in {path!r} has shape {images.shape}; expected '
                    '(N,H,W) or (N,H,W,C) with C 1 or 3')
  if images.shape[0] == 0:
    raise DataError(f'{name}: `images` in {path!r} is empty')
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.integer):
      raise DataError(f'{name}: `images` in {path!r} has dtype {images.dtype}; expected uint8 '
                      '(or integers in 0..255)')
    low, high = images.min(), images.max()
    if low < 0 or high > 255:
      raise DataError(f'{name}: `images` in {path!r} has values in {low}..{high}; expected '
                      'uint8 pixels in 0..255')
    images = images.astype(np.uint8)
    mapped = False

  num_classes = None
  if labels is not None:
    if labels.shape != (images.shape[0],):
      raise DataError(f'{name}: `labels` in {path!r} has shape {labels.shape}; expected '
                      f'({images.shape[0]},), one per image')
    if not np.issubdtype(labels.dtype, np.integer):
      raise DataError(f'{name}: `labels` in {path!r} has dtype {labels.dtype}; expected '
                      'integers')
    if labels.min() < 0:
      raise DataError(f'{name}: `labels` in {path!r} has negative values; expected class '
                      'indices 0..K-1')
    labels = labels.astype(np.int32)
    num_classes = int(labels.max()) + 1
  return ArrayImageSource(name, images, labels, num_classes, reopen_path=path if mapped else None)


# ----------------------------------------------------------------- folder ---


def _open_folder(root: str, name: str) -> ImageSource:
  """Lists PATH/<class>/<image> files; classes sorted by name, like ImageNet."""
  if not os.path.isdir(root):
    raise DataError(f'{name}: no such directory {root!r}; expected one sub-folder of JPEG/PNG '
                    'images per class')
  classes = sorted(entry.name for entry in os.scandir(root)
                   if entry.is_dir() and not entry.name.startswith('.'))
  if not classes:
    raise DataError(f'{name}: {root!r} has no class sub-folders; expected '
                    f'{root}/<class>/<image>.jpg|png')
  paths, labels = [], []
  for label, class_name in enumerate(classes):
    class_dir = os.path.join(root, class_name)
    files = sorted(entry.name for entry in os.scandir(class_dir)
                   if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS))
    paths.extend(os.path.join(class_dir, f) for f in files)
    labels.extend([label] * len(files))
  if not paths:
    raise DataError(f'{name}: the {len(classes)} class folders of {root!r} hold no image files; '
                    f"expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
  return FolderImageSource(name, paths, np.asarray(labels, np.int32), len(classes))


# ------------------------------------------------------------------- tfds ---


def _open_tfds(rest: str, spec: str, tfds_dir: str | None) -> ImageSource:
  """Opens a prepared TFDS dataset with an `image` feature through its data source."""
  data_source, features = open_tfds(rest, spec, tfds_dir, feature='image',
                                    alternative=('an image folder', 'folder:PATH'))
  has_labels = 'label' in features
  num_classes = getattr(features['label'], 'num_classes', None) if has_labels else None
  return TfdsImageSource(spec, data_source, num_classes, has_labels)
