"""Fine-tuning an exported encoder as a classifier, on the trainer.

ViT exports (MAE's, DINO's) follow MAE's main_finetune.py; ResNet exports
(SimCLR's) follow SimCLR's whole-network fine-tuning (google-research/simclr
README.md L157-166: `--fine_tune_after_block=-1 --zero_init_logits_layer=True`).

The model is the exported encoder, rebuilt from the export's config.json,
plus a linear head. On a ViT the head reads the global average of the patch
tokens through a fresh `fc_norm` LayerNorm, or the normed [CLS] token (mae
models_vit.py L34-53); on a ResNet it reads the pooled features, with
BatchNorm in training mode during the steps (SimCLR fine-tunes with
`--global_bn=True`: statistics of the global batch, as ours under jit). The weights come in through
the trainer's `train.init_from=EXPORT`, which fills the part `encoder`
returns; the head starts from trunc_normal(std=2e-5) (main_finetune.py
L257), or from zeros with `model.head_init_std=0` (SimCLR's
`zero_init_logits_layer`). Each step mixes the batch on device with the step's key (mixup 0.8 /
cutmix 1.0, timm's Mixup in 'batch' mode, main_finetune.py L218-225) and
minimises the cross-entropy against the mixed, label-smoothed targets
(SoftTargetCrossEntropy, L290-292), with stochastic depth in the encoder
(`model.drop_path_rate`). Layer-wise lr decay is an optimizer option
(`optim.layer_decay`, ssl_jax/optim.py). The fine-tuned classifier is the
method's `classify` (the online_probe evaluation's top-1 on test_source).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx

from ssl_jax import checkpoint, flops
from ssl_jax.data.normalize import normalize
from ssl_jax.errors import ConfigError
from ssl_jax.methods.base import Batch, Method, Metrics
from ssl_jax.methods.simclr import SimCLR
from ssl_jax.models.initializers import partitioned, torch_trunc_normal
from ssl_jax.models.resnet import ResNet
from ssl_jax.models.transformer import layer_norm
from ssl_jax.models.vit import ViT


# ------------------------------------------------------------------------------
# Mixup / CutMix and the soft-target loss (timm data/mixup.py, loss/cross_entropy.py).
# ------------------------------------------------------------------------------
def mixing_params(rng: jax.Array, height: int, width: int, *, mixup_alpha: float,
                  cutmix_alpha: float, prob: float = 1.0,
                  switch_prob: float = 0.5) -> dict[str, jax.Array]:
  """One batch's draw of timm Mixup._params_per_batch and rand_bbox (mode 'batch').

  With probability `prob` the batch is mixed; with both alphas > 0 it is
  cutmix with probability `switch_prob`, else mixup; lam ~ Beta(alpha, alpha)
  of the chosen one. CutMix's box is a (sqrt(1 - lam) H, sqrt(1 - lam) W)
  rectangle around a uniform centre, clipped to the image (rand_bbox), and
  lam becomes the share of the image left outside it (correct_lam=True).
  Returns lam (the weight of the batch itself), use_cutmix and the box
  (top, bottom, left, right), all scalars.
  """
  mix_key, switch_key, mixup_key, cutmix_key, y_key, x_key = jax.random.split(rng, 6)
  use_cutmix = jnp.asarray(cutmix_alpha > 0 and mixup_alpha <= 0)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(switch_key) < switch_prob
  lam_mixup = jax.random.beta(mixup_key, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
  lam_cutmix = jax.random.beta(cutmix_key, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
  lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
  mixed = jax.random.uniform(mix_key) < prob if mixup_alpha > 0 or cutmix_alpha > 0 else False
  lam = jnp.where(mixed, lam, 1.0).astype(jnp.float32)
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (jnp.floor(height * ratio).astype(jnp.int32),
                  jnp.floor(width * ratio).astype(jnp.int32))
  centre_y = jax.random.randint(y_key, (), 0, height)
  centre_x = jax.random.randint(x_key, (), 0, width)
  top, bottom = (jnp.clip(centre_y - cut_h // 2, 0, height),
                 jnp.clip(centre_y + cut_h // 2, 0, height))
  left, right = (jnp.clip(centre_x - cut_w // 2, 0, width),
                 jnp.clip(centre_x + cut_w // 2, 0, width))
  box_lam = 1.0 - ((bottom - top) * (right - left)) / (height * width)
  use_cutmix = jnp.logical_and(use_cutmix, mixed)
  lam = jnp.where(use_cutmix, box_lam.astype(jnp.float32), lam)
  return {'lam': lam, 'use_cutmix': use_cutmix, 'box': jnp.stack([top, bottom, left, right])}


def mix_batch(images: jax.Array, labels: jax.Array, params: dict[str, jax.Array],
              num_classes: int, smoothing: float) -> tuple[jax.Array, jax.Array]:
  """(B, H, W, C) images, (B,) labels -> mixed images and (B, classes) soft targets.

  Each image is mixed with the batch reversed (timm Mixup._mix_batch:
  `x.flip(0)`): blended by lam (mixup) or with the box pasted from it
  (cutmix); targets are mixup_target's lam * y + (1 - lam) * y.flip(0) of
  label-smoothed one-hots (on 1 - s + s/K, off s/K).
  """
  lam = params['lam']
  flipped = images[::-1]
  top, bottom, left, right = params['box']
  rows = jnp.arange(images.shape[1])[:, None]
  cols = jnp.arange(images.shape[2])[None, :]
  box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # (H, W)
  cut = jnp.where(box[None, :, :, None], flipped, images)
  blend = images * lam.astype(images.dtype) + flipped * (1 - lam).astype(images.dtype)
  mixed = jnp.where(params['use_cutmix'], cut, blend)
  off = smoothing / num_classes
  one_hot = jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off
  return mixed, lam * one_hot + (1.0 - lam) * one_hot[::-1]


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """mean_b sum_k -targets * log_softmax(logits) (timm SoftTargetCrossEntropy), float32."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -(targets * log_probs).sum(-1).mean()


# ------------------------------------------------------------------------------
# The model and the method.
# ------------------------------------------------------------------------------
class FineTuneModel(nnx.Module):
  """The exported encoder, plus `fc_norm` (ViT with global pool only) and the linear `head`."""

  def __init__(self, encoder: ViT | ResNet, num_classes: int, *, global_pool: bool,
               head_init_std: float, rngs: nnx.Rngs):
    self.encoder = encoder
    self.resnet = isinstance(encoder, ResNet)
    self.global_pool = global_pool and not self.resnet  # A ResNet always average-pools.
    width = encoder.num_features if self.resnet else encoder.width
    if self.global_pool:  # models_vit.py L27-32: a new norm after the pool; the last is unused.
      self.fc_norm = layer_norm(width, dtype=jnp.float32, rngs=rngs)
    kernel_init = torch_trunc_normal(head_init_std) if head_init_std else nnx.initializers.zeros
    self.head = nnx.Linear(width, num_classes, rngs=rngs,
                           kernel_init=partitioned(kernel_init, 'embed', None),
                           bias_init=partitioned(nnx.initializers.zeros, None))

  def __call__(self, images: jax.Array, drop_path_key: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """Normalised (B, H, W, C) images -> (B, classes) float32 logits.

    `train` puts a ResNet's BatchNorm on batch statistics (and updates its
    running averages); a ViT's stochastic depth is on when `drop_path_key`
    is given.
    """
    if self.resnet:
      return self.head(self.encoder(images, train=train)['pooled'].astype(jnp.float32))
    out = self.encoder(images, drop_path_key, final_norm=not self.global_pool)
    if self.global_pool:  # models_vit.py L47-48.
      pooled = self.fc_norm(out['tokens'][:, 1:].mean(axis=1).astype(jnp.float32))
    else:
      pooled = out['cls'].astype(jnp.float32)
    return self.head(pooled)


# The exported encoder of each method the fine-tuning takes.
ENCODERS = {'mae': 'vit', 'dino': 'vit', 'simclr': 'resnet'}


@functools.cache
def _export_config(path: str) -> ml_collections.ConfigDict:
  return checkpoint.load_config(epath.Path(path) / 'config.json')


class FineTune(Method):
  """Supervised fine-tuning of an exported ViT (MAE main_finetune.py) or ResNet (SimCLR's)."""

  capabilities = frozenset({'features', 'online_probe'})
  classifier_title = 'fine-tuned classifier top-1'

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    source = config.model.encoder_from or config.train.get('init_from')
    if not source or not (epath.Path(source) / 'encoder').is_dir():
      raise ConfigError(
          f'method finetune rebuilds its encoder from an export: set config.train.init_from '
          f'(or config.model.encoder_from, for a random-init baseline) to an export '
          f'directory holding encoder/ and config.json; got {source!r}')
    self.source = _export_config(str(source))
    if self.source.method not in ENCODERS:
      raise ConfigError(f'finetune fine-tunes the encoders of {sorted(ENCODERS)} exports, not '
                        f'{self.source.method!r}')

  def build_encoder(self, rngs: nnx.Rngs) -> ViT | ResNet:
    """The export's encoder with this run's dtype (and, on a ViT, drop path)."""
    m, source = self.config.model, self.source
    if ENCODERS[source.method] == 'resnet':  # SimCLR's ResNet, at this run's dtype and remat.
      source = ml_collections.ConfigDict(source.to_dict())
      source.model.update(dict(dtype=m.dtype, remat=m.get('remat', 'none')))
      return SimCLR(source).build_encoder(rngs)
    dino = (dict(posemb='learned', image_size=source.augment.global_size, init='dino')
            if source.method == 'dino' else {})
    return ViT(patch_size=source.model.patch_size, channels=source.data.channels,
               width=source.model.width, depth=source.model.depth,
               num_heads=source.model.num_heads, mlp_dim=source.model.mlp_dim,
               dtype=jnp.dtype(m.dtype), remat=m.remat, drop_path_rate=m.drop_path_rate,
               rngs=rngs, **dino)

  def build(self, rngs: nnx.Rngs) -> FineTuneModel:
    """Encoder + (fc_norm) + head with `model.num_classes` outputs."""
    m = self.config.model
    return FineTuneModel(self.build_encoder(rngs), m.num_classes, global_pool=m.global_pool,
                         head_init_std=m.head_init_std, rngs=rngs)

  def _normalize(self, images: jax.Array) -> jax.Array:
    return normalize(images, self.config.data.mean, self.config.data.std)

  def loss_fn(self, model: FineTuneModel, batch: Batch, rng: jax.Array,
              step: jax.Array) -> tuple[jax.Array, Metrics]:
    """Soft-target cross-entropy of the mixed, smoothed batch (main_finetune.py L290-292)."""
    del step
    a = self.config.augment
    mix_key, drop_path_key = jax.random.split(rng)
    images = self._normalize(batch['image'])  # (B, H, W, C)
    params = mixing_params(mix_key, images.shape[1], images.shape[2], mixup_alpha=a.mixup,
                           cutmix_alpha=a.cutmix, prob=a.mixup_prob,
                           switch_prob=a.mixup_switch_prob)
    images, targets = mix_batch(images, batch['label'], params, self.config.model.num_classes,
                                a.smoothing)
    logits = model(images, drop_path_key, train=True)
    loss = soft_target_cross_entropy(logits, targets)
    # Top-1 against the larger of the two mixed labels: a rough train accuracy.
    dominant = jnp.where(params['lam'] >= 0.5, batch['label'], batch['label'][::-1])
    return loss, {'train_top1': (logits.argmax(-1) == dominant).mean(),
                  'mix_lam': params['lam']}

  def train_flops_per_example(self) -> float:
    """Model FLOPs of one image's step, for MFU: the encoder's forward + backward and the head."""
    m, data, source = self.config.model, self.config.data, self.source
    if ENCODERS[source.method] == 'resnet':
      width = flops.resnet_features(source.model)
      encoder = 3 * flops.resnet_forward_flops(source.model, data.image_size, data.channels)
    else:
      width = source.model.width
      encoder = flops.vit_train_flops(data.image_size, source.model.patch_size, data.channels,
                                      width, source.model.mlp_dim, source.model.depth)
    return encoder + 6 * width * m.num_classes

  def encoder(self, model: FineTuneModel) -> ViT | ResNet:
    """The encoder (what `train.init_from` fills and the run exports), without the head."""
    return model.encoder

  def features(self, encoder: ViT | ResNet, images: jax.Array) -> jax.Array:
    """uint8 images -> a ViT's `config.eval.pool` output, or a ResNet's pooled features."""
    if isinstance(encoder, ResNet):
      return encoder(self._normalize(images), train=False)['pooled'].astype(jnp.float32)
    return encoder(self._normalize(images))[self.config.eval.pool].astype(jnp.float32)

  def classify(self, model: FineTuneModel, images: jax.Array) -> jax.Array:
    """uint8 images -> the fine-tuned classifier's logits (no mixing, no drop path)."""
    return model(self._normalize(images))
