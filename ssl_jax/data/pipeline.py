"""grain input pipelines: an infinite, resumable train stream and eval passes.

Train stream, the same on every process and every machine for one seed:

  source -> shuffle (a new permutation each epoch) -> repeat forever
         -> random_resized_crop [+ flip] + channels (rng = f(seed, position))
         -> every process_count-th element from process_index -> batch

The crop step makes one image of `data.image_size` (MAE), or, when the method
declares `ViewSpec`s (SimCLR, DINO), every view of every spec, each a random
resized crop of the whole decoded image cut straight to its own size (the
torchvision / tf.data pipelines of the references do the same); the colour
part of those views is left to the jitted step (data/device_augment.py).

The shuffle and the augmentation happen on the GLOBAL stream and each process
then takes its strided share (as torch's DistributedSampler does). So within
an epoch the processes' shares are disjoint, and global batch k -- the union
of every process's batch k -- holds the same images and the same crops for
any process_count: a run on 4 hosts sees the data a run on 1 host sees.

The iterator's state is one integer, the global position in that stream
(grain's ElasticIterator), saved next to the train state with
`grain.checkpoint.CheckpointSave(iterator)`. A restored iterator yields the
very same batches, even with another num_workers or process_count.

Config keys read from `config.data`: source, tfds_dir, batch_size (global),
image_size, channels, crop_scale, crop_ratio, hflip (these three only without
view specs), eval_crop_fraction, interpolation, num_workers, prefetch.
"""

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np

from ssl_jax.data import augment
from ssl_jax.data.images import ImageSource, open_image_source
from ssl_jax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
  """Random-resized crop + optional flip at `image_size`, then channels (MAE's train view)."""

  image_size: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  hflip: bool
  channels: int
  interpolation: str = 'bilinear'

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Augments one {'image', 'label'} example with grain's per-position rng."""
    image = augment.random_resized_crop(
        element['image'], rng, self.image_size, self.crop_scale, self.crop_ratio,
        self.interpolation)
    if self.hflip:
      image = augment.horizontal_flip(image, rng)
    return {'image': augment.to_channels(image, self.channels), 'label': element['label']}


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """`count` views per image, each a random resized crop of the WHOLE image + a flip.

  The batch carries them as `name`: uint8 (B, count, size, size, C). A crop
  box follows torchvision's RandomResizedCrop (`crop_scale` of the image's
  area, aspect ratio log-uniform in `crop_ratio`), is cut from the decoded
  image and resized once, straight to `size` (Pillow, `interpolation`), then
  mirrored with probability `flip_prob`. `config_keys` maps a field to the
  config key it came from, so that a bad value is reported by its key.
  """

  name: str
  count: int
  size: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  flip_prob: float
  interpolation: str
  config_keys: dict[str, str] = dataclasses.field(default_factory=dict, compare=False)

  def check(self) -> None:
    """Raises ConfigError naming the config key of the first impossible field."""
    for field in ('count', 'size', 'crop_scale', 'crop_ratio', 'flip_prob', 'interpolation'):
      ok, expected = _VALID[field]
      value = getattr(self, field)
      if not ok(value):
        key = self.config_keys.get(field, f'{field} of the view spec {self.name!r}')
        raise ConfigError(f'{key}={value!r}; expected {expected}')


@dataclasses.dataclass(frozen=True)
class MultiViewTransform(grain.transforms.RandomMap):
  """Every view of every spec from one whole image, in spec order, then channels."""

  specs: tuple[ViewSpec, ...]
  channels: int

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """{'image', 'label'} -> {spec.name: uint8 (count, size, size, C), 'label'}."""
    image, out = element['image'], {'label': element['label']}
    for spec in self.specs:
      views = []
      for _ in range(spec.count):  # Crop then flip, view after view, as DataAugmentationDINO.
        view = augment.random_resized_crop(image, rng, spec.size, spec.crop_scale,
                                           spec.crop_ratio, spec.interpolation)
        view = augment.horizontal_flip(view, rng, spec.flip_prob)
        views.append(augment.to_channels(view, self.channels))
      out[spec.name] = np.stack(views)  # (count, size, size, C)
    return out


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
  """Resize + center crop, channel conversion, and a `valid` flag."""

  image_size: int
  crop_fraction: float
  channels: int
  interpolation: str = 'bilinear'

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    """Prepares one {'image', 'label'} example for evaluation."""
    image = augment.center_crop_resize(element['image'], self.image_size, self.crop_fraction,
                                       self.interpolation)
    return {'image': augment.to_channels(image, self.channels),
            'label': element['label'], 'valid': np.bool_(True)}


_TRAIN_KEYS = ('image_size', 'channels', 'crop_scale', 'crop_ratio', 'interpolation',
               'num_workers', 'prefetch')
_VIEW_TRAIN_KEYS = ('channels', 'num_workers', 'prefetch')  # The specs hold the rest.
_EVAL_KEYS = ('image_size', 'channels', 'eval_crop_fraction', 'interpolation', 'prefetch')

_VALID = {
    'image_size': (lambda v: v > 0, 'a positive int'),
    'size': (lambda v: isinstance(v, int) and v > 0, 'a positive int'),
    'count': (lambda v: isinstance(v, int) and v > 0, 'a positive int'),
    'channels': (lambda v: v in (1, 3), '1 or 3'),
    'crop_scale': (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
                   '(low, high) with 0 < low <= high <= 1'),
    'crop_ratio': (lambda v: len(v) == 2 and 0 < v[0] <= v[1], '(low, high), 0 < low <= high'),
    'flip_prob': (lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    'eval_crop_fraction': (lambda v: 0 < v <= 1, 'in (0, 1]'),
    'interpolation': (lambda v: v in augment.INTERPOLATIONS,
                      f'one of {sorted(augment.INTERPOLATIONS)}'),
    'num_workers': (lambda v: v >= 0, '>= 0'),
    'prefetch': (lambda v: v >= 0, '>= 0'),
}


def _check_config(data: ml_collections.ConfigDict, keys: tuple[str, ...]) -> None:
  """Raises DataError naming the first of `data.<keys>` with an impossible value."""
  for key in keys:
    ok, expected = _VALID[key]
    if not ok(data[key]):
      raise DataError(f'config.data.{key}={data[key]!r}; expected {expected}')


def per_process_batch_size(batch_size: int, process_count: int, what: str) -> int:
  """The per-process share of a global batch; DataError unless it divides evenly."""
  if batch_size <= 0 or batch_size % process_count:
    raise DataError(f'{what}={batch_size} must be a positive multiple of the process count '
                    f'{process_count}')
  return batch_size // process_count


def check_process_index(process_index: int, process_count: int) -> None:
  """ValueError unless 0 <= process_index < process_count."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count})')


def _read_options(data: ml_collections.ConfigDict) -> grain.ReadOptions:
  """Threads that keep `data.prefetch` batches ready in this process."""
  # One element of the grain stream is a whole batch, so `prefetch` threads
  # each assemble one batch; 0 reads synchronously in the caller's thread.
  return grain.ReadOptions(num_threads=data.prefetch, prefetch_buffer_size=data.prefetch)


def train_dataset(
    data: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    views: tuple[ViewSpec, ...] | None = None,
) -> tuple[grain.IterDataset, ImageSource]:
  """The infinite, shuffled, augmented train stream of this process, and its source.

  `iter()` of the returned dataset gives batches {'image': uint8 (b, S, S, C),
  'label': int32 (b,)} with b = data.batch_size // process_count, S =
  data.image_size; with `views`, {spec.name: uint8 (b, spec.count, spec.size,
  spec.size, C) for each spec, 'label': int32 (b,)} instead. The iterator
  supports get_state()/set_state() and grain.checkpoint.CheckpointSave/Restore.
  It is one iterator per dataset (grain's ElasticIterator): `iter()` twice
  gives the same object, so call train_dataset again for an independent one.
  Every user error (bad source, batch size) is raised here, not at next().
  """
  _check_config(data, _VIEW_TRAIN_KEYS if views else _TRAIN_KEYS)
  for spec in views or ():
    spec.check()
  if views is not None and (not views or len({spec.name for spec in views}) < len(views)
                            or {spec.name for spec in views} & {'label', 'image'}):
    raise ConfigError(f'view specs {[spec.name for spec in views]}: expected at least one, '
                      "with distinct names other than 'label' and 'image'")
  batch_size = per_process_batch_size(data.batch_size, process_count, 'config.data.batch_size')
  check_process_index(process_index, process_count)
  if seed < 0:
    raise DataError(f'seed={seed}: grain needs a non-negative seed')
  source = open_image_source(data.source, tfds_dir=data.tfds_dir)
  if len(source) < data.batch_size:
    raise DataError(
        f'{source.name} has {len(source)} images, fewer than one global batch of '
        f'config.data.batch_size={data.batch_size} ({batch_size} per process x '
        f'{process_count} processes); lower the batch size or use more data')
  if views:
    transform = MultiViewTransform(tuple(views), data.channels)
  else:
    transform = TrainTransform(
        image_size=data.image_size, crop_scale=tuple(data.crop_scale),
        crop_ratio=tuple(data.crop_ratio), hflip=data.hflip, channels=data.channels,
        interpolation=data.interpolation)
  # Decode and augment one example now so an unreadable source fails here.
  transform.random_map(source[0], np.random.default_rng(0))

  dataset = (
      grain.MapDataset.source(source)
      .seed(seed)    # grain derives the shuffle and augmentation seeds from it.
      .shuffle()     # repeat() reseeds it: a new permutation every epoch.
      .repeat()
      .random_map(transform)    # rng = f(seed, global position): resumable.
  )
  return process_stream(dataset, data, process_index, process_count), source


def process_stream(dataset: grain.MapDataset, data: ml_collections.ConfigDict,
                   process_index: int, process_count: int) -> grain.experimental.ElasticIterator:
  """This process's batches of an endless global `dataset` (images or text windows).

  ElasticIterator takes every process_count-th element of the global stream
  from process_index, batches it, reads with threads (and `data.num_workers`
  worker processes), and keeps as state only the global position: a
  checkpoint restores into any num_workers or process_count.
  """
  workers = None
  if data.num_workers > 0:
    workers = grain.MultiprocessingOptions(num_workers=data.num_workers,
                                           per_worker_buffer_size=max(1, data.prefetch))
  return grain.experimental.ElasticIterator(
      dataset, data.batch_size, grain.sharding.ShardOptions(process_index, process_count),
      read_options=_read_options(data), multiprocessing_options=workers)


def describe_train(data: ml_collections.ConfigDict, source: ImageSource,
                   process_count: int = 1, views: tuple[ViewSpec, ...] | None = None) -> str:
  """A one-line summary of the train pipeline for logs."""
  classes = f'{source.num_classes} classes' if source.has_labels else 'no labels'
  if views:
    crop = ' + '.join(
        f'{spec.name} {spec.count} x random_resized_crop {spec.size}px {spec.interpolation} '
        f'scale={tuple(spec.crop_scale)} ratio=({spec.crop_ratio[0]:.3g}, '
        f'{spec.crop_ratio[1]:.3g}) flip p={spec.flip_prob:g}' for spec in views
    ) + ' of the whole image (colour on device)'
  else:
    crop = (f'random_resized_crop {data.image_size}px {data.interpolation} '
            f'scale={tuple(data.crop_scale)} ratio=({data.crop_ratio[0]:.3g}, '
            f'{data.crop_ratio[1]:.3g})' + (' + hflip' if data.hflip else ''))
  return (
      f'{source.name} ({len(source)} images, {classes}) -> {crop} -> {data.channels} channel(s); '
      f'batch {data.batch_size} = {data.batch_size // process_count} x {process_count} '
      f'process(es); {data.num_workers} worker process(es), {data.prefetch} prefetch thread(s)')


class EvalBatches(Iterator[Batch]):
  """An in-order eval pass over this process's share, padded to a common length.

  Every process yields `num_batches` batches of the same size, so collectives
  over hosts line up; padding examples have valid=False, label -1 and black
  images. `num_examples` is the number of real examples over all processes.
  """

  def __init__(self, iterator: Iterator[Batch], num_batches: int, num_examples: int):
    self._iterator = iterator
    self.num_batches = num_batches
    self.num_examples = num_examples

  def __len__(self) -> int:
    return self.num_batches

  def __next__(self) -> Batch:
    return next(self._iterator)

  def close(self) -> None:
    """Stops grain's prefetch threads early (they also stop at the end)."""
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()


def eval_source_size(data: ml_collections.ConfigDict, source_spec: str) -> int:
  """Number of real examples in an eval source (over all processes)."""
  return len(open_image_source(source_spec, tfds_dir=data.tfds_dir))


def eval_batches(
    data: ml_collections.ConfigDict,
    source_spec: str,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> EvalBatches:
  """Deterministic in-order eval batches of this process's share of `source_spec`.

  Yields {'image': uint8 (b, S, S, C), 'label': int32 (b,), 'valid': bool (b,)}
  with b = batch_size // process_count (batch_size is global), S =
  data.image_size, center-cropped with data.eval_crop_fraction. Process p gets
  examples p, p + P, p + 2P, ...; all processes yield the same number of batches.
  """
  _check_config(data, _EVAL_KEYS)
  local_batch = per_process_batch_size(batch_size, process_count, 'eval batch_size')
  check_process_index(process_index, process_count)
  source = open_image_source(source_spec, tfds_dir=data.tfds_dir)
  transform = EvalTransform(data.image_size, data.eval_crop_fraction, data.channels,
                            data.interpolation)
  transform.map(source[0])  # An unreadable source fails here, not mid-eval.

  filler = {
      'image': np.zeros((data.image_size, data.image_size, data.channels), np.uint8),
      'label': np.int32(-1),
      'valid': np.bool_(False),
  }
  return padded_eval_batches(grain.MapDataset.source(source).map(transform), filler, data,
                             local_batch=local_batch, process_index=process_index,
                             process_count=process_count)


def padded_eval_batches(examples: grain.MapDataset, filler: dict[str, Any],
                        data: ml_collections.ConfigDict, *, local_batch: int,
                        process_index: int, process_count: int) -> EvalBatches:
  """In-order batches of this process's share of `examples`, the last ones filled with `filler`.

  Process p gets examples p, p + P, p + 2P, ... (P = process_count) in
  batches of `local_batch`; the largest share decides the batch count, so
  every process yields the same number of batches and collectives over hosts
  line up. `filler` is one padding example, which the caller marks as not
  counting (valid=False, weight 0). `num_examples` of the result is
  len(examples), the real examples over all processes.
  """
  num_batches = math.ceil(math.ceil(len(examples) / process_count) / local_batch)
  share = examples[process_index::process_count]
  num_padding = num_batches * local_batch - len(share)
  parts = [share] if len(share) else []
  if num_padding:
    parts.append(grain.MapDataset.range(num_padding).map(lambda _: filler))
  dataset = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
  iterator = iter(dataset.batch(local_batch).to_iter_dataset(_read_options(data)))
  return EvalBatches(iterator, num_batches, len(examples))
