"""SimCLR (Chen et al. 2020): contrast two augmented views of every image.

Each image gives two views. Their geometry is made on the host from the whole
decoded image (`view_specs`: a random resized crop cut straight to the view
size, then a flip, in the grain pipeline), their colour on device inside the
jitted step (colour jitter, grayscale, blur), each view of each image with
its own key. A ResNet encodes both views in one batch of 2N (so
BatchNorm statistics are those of the whole global batch, across devices),
a projection MLP maps them to z, and NT-Xent pulls the two views of an image
together against all 2N - 2 other views. An online linear probe on
stop-gradient features reports how good the representation is while it trains.

The optimised objective is the reference's (`contrastive_objective`): the sum
of the two directions' mean cross-entropies, twice `losses.ntxent_loss`.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ssl_jax import flops, losses
from ssl_jax.data import device_augment
from ssl_jax.data.normalize import denormalize, normalize, standardize
from ssl_jax.data.pipeline import ViewSpec
from ssl_jax.methods.base import Batch, Method, Metrics
from ssl_jax.models.heads import LinearProbe, ProjectionMLP, probe_loss_and_accuracy
from ssl_jax.models.resnet import ResNet
from ssl_jax.pictures import image_grid


def contrastive_objective(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
  """SimCLR's optimised loss: loss_a + loss_b, each a mean over the N anchors of one view.

  google-research/simclr tf2/objective.py, add_contrastive_loss (lines 83-87):
  `loss = tf.reduce_mean(loss_a + loss_b)`, where loss_a holds view 1's
  anchors against both views and loss_b view 2's. That is twice
  `losses.ntxent_loss`, the mean over all 2N anchors. The scale matters
  under LARS: the batch-norm and bias parameters skip the trust ratio, so
  with the mean over 2N they would move at half the reference's rate.
  """
  return 2.0 * losses.ntxent_loss(z1, z2, temperature)


class SimCLRModel(nnx.Module):
  """ResNet encoder, projection MLP and the online linear probe."""

  def __init__(self, encoder: ResNet, projector: ProjectionMLP, online_probe: LinearProbe):
    self.encoder = encoder
    self.projector = projector
    self.online_probe = online_probe


class SimCLR(Method):
  """The SimCLR method: two views of every image, NT-Xent over the global batch."""

  capabilities = frozenset({'features', 'online_probe', 'pictures'})
  batch_coupling = ('NT-Xent takes the rest of the batch as negatives and the ResNet\'s '
                    'BatchNorm normalises over the batch: micro-batches would see fewer of both')

  picture_name = 'views'

  def build_encoder(self, rngs: nnx.Rngs) -> ResNet:
    """A freshly initialised ResNet of the configured depth, width and stem."""
    m = self.config.model
    return ResNet(depth=m.depth, stem=m.stem, width_multiplier=m.width_multiplier,
                  zero_init_residual=m.zero_init_residual, channels=self.config.data.channels,
                  dtype=jnp.dtype(m.dtype), remat=m.get('remat', False), rngs=rngs)

  def build(self, rngs: nnx.Rngs) -> SimCLRModel:
    """Encoder, projection head and online probe, as configured in `config.model`."""
    m = self.config.model
    encoder = self.build_encoder(rngs)
    projector = ProjectionMLP(encoder.num_features, m.projection_hidden, m.projection_dim,
                              num_layers=m.projection_layers, dtype=jnp.dtype(m.dtype),
                              rngs=rngs)
    probe = LinearProbe(encoder.num_features, m.num_classes, rngs=rngs)
    return SimCLRModel(encoder, projector, probe)

  @classmethod
  def view_specs(cls, config: ml_collections.ConfigDict) -> tuple[ViewSpec, ...]:
    """Two random resized crops of the whole image at `augment.size`, each maybe flipped."""
    # google-research/simclr tf2/data_util.py: preprocess_for_train crops
    # (crop_and_resize, lines 298-320: area 0.08-1, aspect 3/4-4/3, bicubic)
    # and flips (line 469, p 0.5) the decoded image; data.py lines 54-58 make
    # two such views of each image. The box is drawn as torchvision draws it
    # (10 tries, else a center crop); TF's sampler makes 100 tries, else the
    # whole image: with scale 0.08-1 the first tries nearly always fit.
    a = config.augment
    keys = {'size': 'config.augment.size', 'crop_scale': 'config.augment.crop_scale',
            'crop_ratio': 'config.augment.crop_ratio',
            'interpolation': 'config.data.interpolation'}
    return (ViewSpec('views', count=2, size=a.size, crop_scale=tuple(a.crop_scale),
                     crop_ratio=tuple(a.crop_ratio), flip_prob=0.5 if a.flip else 0.0,
                     interpolation=config.data.interpolation, config_keys=keys),)

  def _views(self, views: jax.Array, rng: jax.Array) -> jax.Array:
    """uint8 host views (B, 2, S, S, C) -> coloured, normalised (B, 2, S, S, C)."""
    a = self.config.augment
    coloured = device_augment.augment_views(
        rng, views, device_augment.simclr_colour, jitter_strength=a.jitter_strength,
        jitter_prob=a.jitter_prob, grayscale_prob=a.grayscale_prob, blur_prob=a.blur_prob)
    return standardize(coloured, self.config.data.mean, self.config.data.std)

  def loss_fn(self, model: SimCLRModel, batch: Batch, rng: jax.Array,
              step: jax.Array) -> tuple[jax.Array, Metrics]:
    """The reference's objective (2 x NT-Xent) of the projections, plus the probe's loss."""
    del step
    views = self._views(batch['views'], rng)  # (B, 2, S, S, C)
    num = views.shape[0]
    # Example-major (B * 2) rows: each device keeps its own examples' views.
    features = model.encoder(views.reshape(2 * num, *views.shape[2:]), train=True)['pooled']
    z = model.projector(features, train=True).reshape(num, 2, -1)  # (B, 2, projection_dim)
    contrastive = contrastive_objective(z[:, 0], z[:, 1], self.config.model.temperature)
    labels = jnp.repeat(batch['label'], 2)  # (2B,) in the rows' order
    probe_loss, probe_accuracy = probe_loss_and_accuracy(model.online_probe(features), labels)
    # The probe's loss only reaches the probe (its input is stop-gradient).
    return contrastive + probe_loss, {
        'loss': contrastive, 'probe_loss': probe_loss, 'probe_train_top1': probe_accuracy}

  def train_flops_per_example(self) -> float:
    """Model FLOPs of one image's step, for MFU (`ssl_jax.flops.simclr_train_flops`)."""
    return flops.simclr_train_flops(self.config)

  def encoder(self, model: SimCLRModel) -> ResNet:
    """The ResNet backbone, without projection head and probe."""
    return model.encoder

  def features(self, encoder: ResNet, images: jax.Array) -> jax.Array:
    """uint8 images -> pooled ResNet features, BatchNorm in inference mode."""
    images = normalize(images, self.config.data.mean, self.config.data.std)
    return encoder(images, train=False)['pooled'].astype(jnp.float32)

  def classify(self, model: SimCLRModel, images: jax.Array) -> jax.Array:
    """uint8 images -> the online probe's logits."""
    return model.online_probe(self.features(model.encoder, images))

  def visualize(self, model: SimCLRModel, batch: Batch, rng: jax.Array):
    """The two views (host crops after the device colour) of the first 8 images of the batch."""
    del model
    return {'views': self._views(batch['views'][:8], rng)}  # (8, 2, S, S, C)

  def render(self, arrays) -> np.ndarray:
    """Two rows: first views over second views."""
    views = np.asarray(arrays['views'])
    pixels = denormalize(views, self.config.data.mean, self.config.data.std)
    return image_grid(pixels.swapaxes(0, 1))
