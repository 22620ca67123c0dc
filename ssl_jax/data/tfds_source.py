"""Opening a prepared TFDS dataset for grain, for the image and the text sources.

`tfds:NAME[:SPLIT]` names a TFDS builder (NAME may carry a config and a
version, 'imagenet2012/subset:5.1.0') and a split in TFDS's split syntax
('train', 'train[:99%]'; 'train' when absent). The dataset must already be
prepared as array_record (or parquet), the formats with random access that
grain reads. Nothing is ever downloaded: offline, tfds with download=True
waits ~200 s on the network before failing, so a missing dataset fails at
once with a message saying how to prepare it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from ssl_jax.errors import DataError

# The split may hold ':' inside its slice ('train[:99%]').
_TFDS_SPEC = re.compile(r'^(?P<name>[^:\[\]]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$')

# File formats whose examples can be read by index.
_RANDOM_ACCESS_FORMATS = ('ARRAY_RECORD', 'PARQUET')


def parse_tfds_spec(rest: str, spec: str) -> tuple[str, str]:
  """(name, split) of the part after 'tfds:'; the split defaults to 'train'."""
  match = _TFDS_SPEC.match(rest)
  if not match:
    raise DataError(f'{spec}: expected tfds:NAME[:SPLIT], e.g. tfds:imagenet2012:validation')
  return match['name'], match['split'] or 'train'


def prepare_hint(name: str, data_dir: str, alternative: tuple[str, str]) -> str:
  """How to build the array_record files that grain reads, for `name`."""
  build = f'tfds build {name} --data_dir={data_dir} --file_format=array_record'
  if name.split('/')[0].split(':')[0] == 'imagenet2012':
    steps = ('download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
             f'from image-net.org into {data_dir}/downloads/manual/, then '
             f'`pip install tensorflow` and `{build}`')
  else:
    steps = f'`pip install tensorflow` and `{build}`'
  what, form = alternative
  return f'To prepare it: {steps}. Or, without TensorFlow, use {what}: --config.data.source={form}'


def open_tfds(rest: str, spec: str, tfds_dir: str | None, *, feature: str,
              alternative: tuple[str, str]) -> tuple[Any, Any]:
  """(data source, features) of the prepared TFDS dataset `spec` = 'tfds:' + `rest`.

  Args:
    rest: NAME[:SPLIT], the spec after 'tfds:'.
    spec: the whole spec, named in error messages.
    tfds_dir: the TFDS data dir; None for TFDS's default.
    feature: the feature the caller reads ('image', 'text'); its absence is an error.
    alternative: (what, spec form) of the source to suggest instead, e.g.
      ('an image folder', 'folder:PATH').
  """
  name, split = parse_tfds_spec(rest, spec)
  # Imported here: only this source needs it (~0.4 s).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  data_dir = tfds_dir or tfds.core.constants.get_default_data_dir()
  try:
    builder = tfds.builder(name, data_dir=tfds_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(f'{spec}: TFDS has no dataset named {name!r} (data dir {data_dir}); see '
                    f'https://www.tensorflow.org/datasets/catalog for names, or use '
                    f'{alternative[0]}: --config.data.source={alternative[1]}') from e
  hint = prepare_hint(name, str(builder.data_dir_root), alternative)
  # Checked here rather than left to tfds: with download=True unprepared data
  # hangs ~200 s on the network, and with download=False tfds raises a
  # misleading 'Random access ... FileFormat.TFRECORD is not supported'.
  if not builder.is_prepared():
    raise DataError(f'{spec}: TFDS dataset {name!r} is not prepared in data dir '
                    f'{builder.data_dir_root} (looked for {builder.data_path}). {hint}')
  file_format = str(builder.info.file_format)
  if not any(f in file_format.upper() for f in _RANDOM_ACCESS_FORMATS):
    raise DataError(f'{spec}: {builder.data_path} was prepared as {file_format}, which has no '
                    f'random access for grain: rebuild it with --file_format=array_record. {hint}')
  features = builder.info.features
  if feature not in features:
    raise DataError(f'{spec}: the dataset has features {list(features)}; expected '
                    f'a `{feature}` feature')
  try:
    # Same as tfds.data_source(name, split=..., download=False) on the
    # builder already checked above.
    data_source = builder.as_data_source(split=split)
  except (ValueError, KeyError) as e:
    raise DataError(f'{spec}: bad split {split!r}; the dataset has splits '
                    f'{list(builder.info.splits)}: {e}') from e
  return data_source, features


def write_text_dataset(name: str, documents: Callable[[], Iterable[str]], data_dir: str) -> None:
  """Writes `documents` as the 'train' split of a TFDS text dataset `name` (array_record).

  For one's own corpus without TensorFlow: afterwards `--config.data.source=tfds:NAME`
  with `--config.data.tfds_dir=DATA_DIR` reads it. `name` is snake_case; each
  document becomes one example with a 'text' feature; `documents` is called once.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    del self
    return enumerate({'text': text} for text in documents())

  # TFDS names a builder after its class: CamelCase of `name`.
  class_name = ''.join(part.capitalize() for part in name.split('_'))
  builder = type(class_name, (tfds.core.GeneratorBasedBuilder,), {
      'VERSION': tfds.core.Version('1.0.0'), '_info': _info,
      '_split_generators': _split_generators, '_generate_examples': _generate_examples,
      '__module__': __name__})
  if builder.name != name:
    raise DataError(f'write_text_dataset: {name!r} is not a snake_case dataset name '
                    f'(TFDS would call it {builder.name!r})')
  builder(data_dir=data_dir, file_format='array_record').download_and_prepare()
