"""What the trainer and the evaluations read: a run's train stream and held-out batches.

A method declares the data it trains on (`Method.data_spec(config)`, a
`DataSpec`): images, optionally cut into views on the host, or text
packed for an objective. This module builds that data from the config
alone, before any method object exists, because the data decides values
the resolved config holds (the epoch length, the tokenizer's vocabulary).
"""

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
from etils import epath

from ssl_jax.data import pipeline, text, text_sources
from ssl_jax.errors import ConfigError

KINDS = ('images', 'text')


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The data a method trains on."""
  kind: str  # 'images' or 'text'.
  # images: the views the host cuts from each whole image (None: one data.image_size crop).
  views: tuple[pipeline.ViewSpec, ...] | None = None
  # text: the objective the windows are packed for ('causal_lm' or 'masked_lm').
  objective: str = ''

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'DataSpec kind={self.kind!r} is not one of {KINDS}')


@dataclasses.dataclass
class TrainData:
  """A run's infinite, resumable train stream and what the log says about it."""
  dataset: Any  # A grain dataset of this process's batches (its iterator is checkpointed).
  num_examples: int  # Examples in one epoch (steps per epoch = num_examples // batch).
  description: str  # One line for the start-up log.
  # Config values the data decides, by dotted key (e.g. {'model.vocab_size': 4096} from the
  # tokenizer); the trainer sets them before anything is built, and config.json records them.
  config_updates: dict[str, Any] = dataclasses.field(default_factory=dict)


def train_data(config: ml_collections.ConfigDict, spec: DataSpec,
               workdir: epath.PathLike) -> TrainData:
  """This process's share of the train stream of `config.data`, as `spec` asks."""
  if spec.kind == 'images':
    dataset, source = pipeline.train_dataset(
        config.data, seed=config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), views=spec.views)
    return TrainData(dataset, len(source), pipeline.describe_train(
        config.data, source, jax.process_count(), views=spec.views))
  return _text_train_data(config, spec.objective, str(workdir))


def _text_train_data(config: ml_collections.ConfigDict, objective: str,
                     workdir: str) -> TrainData:
  """Packed token windows (the tokenizer is trained or loaded and saved in the workdir)."""
  data, model = config.data, config.model
  if data.objective != objective:
    raise ConfigError(f'config.data.objective={data.objective!r}, but method '
                      f'{config.method!r} trains {objective!r}')
  if data.seq_len > model.max_len:
    raise ConfigError(f'config.data.seq_len={data.seq_len} exceeds config.model.max_len='
                      f'{model.max_len}, the positions the model has')
  dataset, num_windows, summary = text.train_dataset(
      data, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), workdir=workdir)
  corpus = text_sources.tokenized_text(data, workdir)  # Memoised by train_dataset.
  vocab_size, model_vocab = corpus.tokenizer.vocab_size, model.vocab_size
  if model_vocab is not None and model_vocab < vocab_size:
    raise ConfigError(f'config.model.vocab_size={model_vocab} is smaller than the '
                      f'tokenizer\'s {vocab_size} ids; leave it unset to use the tokenizer\'s')
  updates = {'model.vocab_size': vocab_size} if model_vocab is None else {}
  return TrainData(dataset, num_windows, summary + text.chance_baseline(corpus, objective),
                   updates)


def held_out_batches(config: ml_collections.ConfigDict, spec: DataSpec,
                     workdir: epath.PathLike) -> Iterable[dict] | None:
  """This process's padded share of the held-out split (text: every validation window once).

  Images have no held-out split of their own (the probes read the labelled
  `config.eval.train_source` / `test_source`): None.
  """
  if spec.kind != 'text':
    return None
  return text.eval_batches(config.data, batch_size=config.eval.batch_size,
                           process_index=jax.process_index(),
                           process_count=jax.process_count(), workdir=str(workdir))
