"""The surface every pretraining method offers the trainer.

A method is a small object built from the resolved config. The trainer in
`ssl_jax/train.py` only ever calls what is defined here, so it never needs
to know which method it is training.
"""

import abc
import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from ssl_jax.data import pipeline

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass
class TrainData:
  """A method's infinite, resumable train stream and what the log says about it."""
  dataset: Any  # A grain dataset of this process's batches (its iterator is checkpointed).
  num_examples: int  # Examples in one epoch (steps per epoch = num_examples // batch).
  description: str  # One line for the start-up log.
  # Config values the data decides, by dotted key (e.g. {'model.vocab_size': 4096} from the
  # tokenizer); the trainer sets them before anything is built, and config.json records them.
  config_updates: dict[str, Any] = dataclasses.field(default_factory=dict)


class Method(abc.ABC):
  """Base class of pretraining methods (one subclass per file in methods/)."""

  # The unit of throughput shown in the progress line (images/s, tokens/s).
  throughput_unit = 'images'
  # TensorBoard tag of the pictures `render` draws.
  picture_name = 'pictures'

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # ----------------------------------------------------------------------------
  # Data.
  # ----------------------------------------------------------------------------
  def view_specs(self) -> tuple[pipeline.ViewSpec, ...] | None:
    """The views the host cuts from each whole image, or None for one `data.image_size` crop.

    Each spec becomes a batch entry `spec.name` of shape (B, count, size,
    size, C) in place of `image`; the method colours them in `loss_fn`.
    """
    return None

  def train_data(self, workdir: epath.Path) -> TrainData:
    """The train stream: by default the image pipeline of `config.data` and `view_specs`."""
    del workdir
    views = self.view_specs()
    dataset, source = pipeline.train_dataset(
        self.config.data, seed=self.config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), views=views)
    return TrainData(dataset, len(source), pipeline.describe_train(
        self.config.data, source, jax.process_count(), views=views))

  # ----------------------------------------------------------------------------
  # Model and loss.
  # ----------------------------------------------------------------------------
  @abc.abstractmethod
  def build(self, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the whole pretraining model (encoder and any decoder/head/teacher)."""

  @abc.abstractmethod
  def loss_fn(self, model: nnx.Module, batch: Batch, rng: jax.Array,
              step: jax.Array) -> tuple[jax.Array, Metrics]:
    """Scalar loss and a dict of scalar metrics for one global batch."""

  def after_step(self, model: nnx.Module, step: jax.Array) -> None:
    """In-place, non-gradient updates after the optimizer step (e.g. EMA teachers)."""
    del model, step

  def examples_to_units(self, batch_size: int) -> int:
    """How many throughput units (images, tokens) one batch of examples holds."""
    return batch_size

  def train_flops_per_example(self) -> float | None:
    """Model FLOPs of one example's forward + backward pass (for MFU), if known."""
    return None

  def check_metrics(self, scalars: dict[str, float]) -> list[str]:
    """Warnings about logged scalars (e.g. a collapse), printed at log steps."""
    del scalars
    return []

  # ----------------------------------------------------------------------------
  # Held-out evaluation of the pretext task (e.g. a language model's val loss).
  # ----------------------------------------------------------------------------
  def eval_batches(self, workdir: epath.Path) -> Iterable[dict[str, np.ndarray]] | None:
    """This process's share of held-out batches for `eval_step`, or None."""
    del workdir

  def eval_step(self, model: nnx.Module, batch: Batch) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{name: (sum, count)} over one global batch; the evaluator logs val_name = sum / count."""
    raise TypeError(f'{type(self).__name__} defines no held-out eval step.')

  # ----------------------------------------------------------------------------
  # Encoder export and probing.
  # ----------------------------------------------------------------------------
  @abc.abstractmethod
  def encoder(self, model: nnx.Module) -> nnx.Module:
    """The part of `model` that is exported for downstream use."""

  @abc.abstractmethod
  def build_encoder(self, rngs: nnx.Rngs) -> nnx.Module:
    """A freshly initialised encoder of the exported shape."""

  def features(self, encoder: nnx.Module, images: jax.Array) -> jax.Array:
    """(B, H, W, C) uint8 images -> (B, D) float32 features for probes."""
    raise TypeError(f'{type(self).__name__} defines no image features for probing.')

  def classify(self, model: nnx.Module, images: jax.Array) -> jax.Array:
    """(B, H, W, C) uint8 images -> (B, classes) logits of an online probe, if any."""
    raise TypeError(f'{type(self).__name__} has no online probe.')

  def visualize(self, model: nnx.Module, batch: Batch, rng: jax.Array) -> Any:
    """Arrays for a picture of what the model does (or None); see `render`."""
    del model, batch, rng

  def render(self, arrays: Any) -> np.ndarray | None:
    """Host-side: turns `visualize`'s arrays into an (H, W, 3) uint8 picture."""
    del arrays
