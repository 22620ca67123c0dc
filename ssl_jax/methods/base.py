"""The surface every pretraining method offers the trainer and the evaluations.

A method is a small object built once, from the resolved config. The
trainer in `ssl_jax/train.py` and the evaluations in `ssl_jax/eval/` only
ever call what is defined here, so they never need to know which method
they run. What a method must implement: `build`, `loss_fn`, `encoder`,
`build_encoder`, and, at class level, the data it trains on (`data_spec`).
What it may add: `after_step` (EMA teachers), `loss_weight` and
`batch_coupling` (gradient accumulation, `ssl_jax.train_step`), and one
hook per capability it declares in `capabilities`, which the evaluations
the config enables need (checked at setup, before any data is read):

| capability     | hooks                  | evaluations         |
|----------------|------------------------|---------------------|
| 'features'     | `features`             | knn, linear_probe   |
| 'online_probe' | `classify`             | online_probe        |
| 'held_out'     | `eval_step`            | held_out            |
| 'pictures'     | `visualize`, `render`  | pictures            |
"""

import abc
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ssl_jax.data import pipeline
from ssl_jax.data.streams import DataSpec

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

# Capability -> the hooks a method declaring it overrides.
CAPABILITIES = {
    'features': ('features',),
    'online_probe': ('classify',),
    'held_out': ('eval_step',),
    'pictures': ('visualize', 'render'),
}


class Method(abc.ABC):
  """Base class of pretraining methods (one subclass per file in methods/)."""

  # What the evaluations may ask of this method (keys of CAPABILITIES).
  capabilities: frozenset[str] = frozenset()
  # The unit of throughput shown in the progress line (images/s, tokens/s).
  throughput_unit = 'images'
  # TensorBoard tag of the pictures `render` draws.
  picture_name = 'pictures'
  # What `classify` is, in the online_probe evaluation's end-of-run line.
  classifier_title = 'online probe top-1 (trained alongside)'
  # Why one batch's loss is not the weighted mean of its parts' losses (batch
  # statistics, negatives from the rest of the batch), or None when it is.
  # Gradient accumulation (`train.grad_accum_steps` > 1) is refused, with
  # this reason, when it is set: micro-batching would change the objective.
  batch_coupling: str | None = None

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def __init_subclass__(cls, **kwargs):
    """TypeError unless a subclass overrides the hooks of every capability it declares."""
    super().__init_subclass__(**kwargs)
    unknown = sorted(set(cls.capabilities) - set(CAPABILITIES))
    if unknown:
      raise TypeError(f'{cls.__name__}.capabilities: unknown {unknown}; '
                      f'known {sorted(CAPABILITIES)}')
    for capability in cls.capabilities:
      missing = [hook for hook in CAPABILITIES[capability]
                 if getattr(cls, hook) is getattr(Method, hook)]
      if missing:
        raise TypeError(f'{cls.__name__} declares {capability!r} but does not define {missing}')

  # ----------------------------------------------------------------------------
  # Data: declared per class, built by `ssl_jax.data.streams` from the config.
  # ----------------------------------------------------------------------------
  @classmethod
  def data_spec(cls, config: ml_collections.ConfigDict) -> DataSpec:
    """The data this method trains on: by default images, cut as `view_specs` says."""
    return DataSpec('images', views=cls.view_specs(config))

  @classmethod
  def view_specs(cls, config: ml_collections.ConfigDict) -> tuple[pipeline.ViewSpec, ...] | None:
    """The views the host cuts from each whole image, or None for one `data.image_size` crop.

    Each spec becomes a batch entry `spec.name` of shape (B, count, size,
    size, C) in place of `image`; the method colours them in `loss_fn`.
    """
    del config
    return None

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

  def loss_weight(self, batch: Batch) -> jax.Array:
    """How many terms `loss_fn`'s mean over `batch` averages: by default its examples.

    Accumulated micro-batches (`train.grad_accum_steps`) are averaged with
    these weights, so their loss and gradient are the whole batch's.
    """
    return jnp.asarray(jax.tree.leaves(batch)[0].shape[0], jnp.float32)

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
  def eval_step(self, model: nnx.Module, batch: Batch) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{name: (sum, count)} over one global batch of held-out data ('held_out').

    The held_out evaluation sums each over the whole split
    (`ssl_jax.data.streams.held_out_batches`) and logs val_<name> = sum / count.
    """
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
