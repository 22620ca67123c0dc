"""DINO (Caron et al. 2021): self-distillation with no labels.

A student network (ViT + DINOHead) sees 2 global and n local crops of every
image; a teacher of the same shape sees the 2 global crops, and the student
learns to predict, for every other view, the teacher's centred and sharpened
softmax (`losses.dino_loss`). The teacher is not trained: after each
optimizer step it moves towards the student as an EMA whose momentum rises
from 0.996 to 1 on a cosine. Centering (an EMA of the teacher's batch mean,
`losses.dino_center`) and sharpening (a low teacher temperature, warmed up
from 0.04 to 0.07) together keep the outputs from collapsing.

Follows facebookresearch/dino (main_dino.py: DINOLoss, train_one_epoch,
DataAugmentationDINO; utils.py: cosine_scheduler, MultiCropWrapper;
vision_transformer.py: the ViT). The ViT is initialised as DINO's
(`init='dino'`: trunc-normal 0.02 linears, [CLS] and positions), and only
the student drops paths (`model.drop_path_rate`, linear over the blocks;
main_dino.py builds the student with `drop_path_rate=args.drop_path_rate`
and the teacher without, lines 162-166). Difference: schedules are per step
(the reference's teacher temperature changes per epoch).

The teacher's weights are `TeacherWeight` variables, not `nnx.Param`: the
trainer puts them in `model_state`, so they get no gradient and no
optimizer state, yet are checkpointed and restored exactly, like the center.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ssl_jax import flops, losses, optim
from ssl_jax.data import device_augment
from ssl_jax.data.normalize import denormalize, normalize, standardize
from ssl_jax.data.pipeline import ViewSpec
from ssl_jax.methods.base import Batch, Method, Metrics
from ssl_jax.models.heads import DINOHead
from ssl_jax.models.vit import ViT
from ssl_jax.pictures import image_grid


class TeacherWeight(nnx.Variable):
  """A teacher weight: the EMA of a student parameter, never trained by gradient."""


class Center(nnx.Variable):
  """DINO's running center of the teacher outputs, (1, out_dim)."""


def retyped(module: nnx.Module, source: type, target: type) -> nnx.Module:
  """A copy of `module` whose `source` variables are `target` variables (same values)."""
  graphdef, state = nnx.split(module)
  state = jax.tree.map(
      lambda v: target(v.get_value(), **v.get_metadata()) if isinstance(v, source) else v,
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state, copy=True)


# ------------------------------------------------------------------------------
# Schedules (all by step, from the resolved config).
# ------------------------------------------------------------------------------
def teacher_temperature(step: jax.Array, *, start: float, end: float,
                        warmup_steps: int) -> jax.Array:
  """Linear from `start` to `end` over `warmup_steps`, then `end` (DINOLoss's warmup).

  At least one step long: with 0 warmup steps optax would hold `start`.
  """
  return optax.linear_schedule(start, end, max(warmup_steps, 1))(step)


def teacher_momentum(step: jax.Array, *, start: float, total_steps: int) -> jax.Array:
  """Cosine from `start` at step 0 to 1 at `total_steps` (utils.cosine_scheduler(m, 1)).

  1 minus optax's cosine decay of the gap 1 - m, as the reference computes it:
  the small gap keeps its float32 precision near m = 1.
  """
  return 1.0 - optax.cosine_decay_schedule(1.0 - start, max(total_steps, 1))(step)


# ------------------------------------------------------------------------------
# Model.
# ------------------------------------------------------------------------------
class DINONetwork(nnx.Module):
  """A ViT backbone and the DINO head, over crops of several resolutions."""

  def __init__(self, backbone: ViT, head: DINOHead):
    self.backbone = backbone
    self.head = head

  def __call__(self, crops: list[jax.Array], *, train: bool = True,
               drop_path_key: jax.Array | None = None) -> jax.Array:
    """[(B, V_i, H_i, W_i, C)] crops grouped by size -> (sum V_i, B, out_dim) logits.

    As utils.MultiCropWrapper: one backbone pass per resolution, then one
    head pass over all [CLS] features. The backbone's rows are example-major,
    (B * V_i, ...), so a batch sharded over devices stays local to them; the
    head's are view-major, (V * B, ...): with example-major head rows the
    8-device step differed from the 1-device one by 0.4% in the second loss
    on a (2, 2, 2) mesh (jax 0.10.2, CPU), the same in exact arithmetic.
    With `drop_path_key` the backbone drops paths (group i: fold_in(key, i)),
    one draw per (example, view); without it (the teacher) it never does.
    """
    features = []
    for group, views in enumerate(crops):
      batch, num_views = views.shape[:2]
      key = None if drop_path_key is None else jax.random.fold_in(drop_path_key, group)
      cls = self.backbone(views.reshape(batch * num_views, *views.shape[2:]), key)['cls']
      features.append(jnp.swapaxes(cls.reshape(batch, num_views, -1), 0, 1))  # (V_i, B, D)
    features = jnp.concatenate(features)  # (V, B, D)
    num_views, batch, width = features.shape
    logits = self.head(features.reshape(num_views * batch, width), train=train)
    return logits.reshape(num_views, batch, -1)  # (V, B, out_dim)


class DINOModel(nnx.Module):
  """Student (parameters), teacher (TeacherWeight EMA copy) and the center."""

  def __init__(self, student: DINONetwork, out_dim: int):
    self.student = student
    self.teacher = retyped(student, nnx.Param, TeacherWeight)  # Starts equal to the student.
    # The teacher is built without stochastic depth (main_dino.py line 166): its
    # blocks have rate 0 even if a key reached them (the exported encoder too).
    for block in self.teacher.backbone.encoder.blocks:
      block.drop_path_rate = 0.0
    self.center = Center(jnp.zeros((1, out_dim), jnp.float32))


# ------------------------------------------------------------------------------
# The method.
# ------------------------------------------------------------------------------
class DINO(Method):
  """The DINO method: multi-crop self-distillation into an EMA teacher."""

  capabilities = frozenset({'features', 'pictures'})
  batch_coupling = ('the center is an EMA of the batch mean of teacher outputs, updated in the '
                    'loss: micro-batches would move it once each, with their own means (and the '
                    'head\'s optional BatchNorm would normalise over a micro-batch)')

  picture_name = 'attention'

  def build_encoder(self, rngs: nnx.Rngs, drop_path_rate: float = 0.0) -> ViT:
    """A freshly initialised DINO ViT (learned positions at the global crop size).

    The exported encoder is the teacher's backbone: no stochastic depth.
    """
    m = self.config.model
    return ViT(patch_size=m.patch_size, channels=self.config.data.channels, width=m.width,
               depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
               dtype=jnp.dtype(m.dtype), remat=m.remat, posemb='learned',
               image_size=self.config.augment.global_size, init='dino',
               drop_path_rate=drop_path_rate, rngs=rngs)

  def build(self, rngs: nnx.Rngs) -> DINOModel:
    """Student ViT + head, the teacher copy and a zero center."""
    m = self.config.model
    head = DINOHead(m.width, m.out_dim, hidden_dim=m.head_hidden_dim,
                    bottleneck_dim=m.head_bottleneck_dim, num_layers=m.head_layers,
                    use_bn=m.head_use_bn, norm_last_layer=m.norm_last_layer,
                    dtype=jnp.dtype(m.dtype), rngs=rngs)
    backbone = self.build_encoder(rngs, drop_path_rate=m.drop_path_rate)
    return DINOModel(DINONetwork(backbone, head), m.out_dim)

  # ----------------------------------------------------------------------------
  # Schedules of this run.
  # ----------------------------------------------------------------------------
  def teacher_temperature(self, step: jax.Array) -> jax.Array:
    """The teacher temperature at `step`."""
    m = self.config.model
    return teacher_temperature(
        step, start=m.warmup_teacher_temp, end=m.teacher_temp,
        warmup_steps=round(m.warmup_teacher_temp_epochs * self.config.train.steps_per_epoch))

  def teacher_momentum(self, step: jax.Array) -> jax.Array:
    """The EMA momentum of the teacher update after step `step`."""
    return teacher_momentum(step, start=self.config.model.teacher_momentum,
                            total_steps=self.config.train.steps)

  # ----------------------------------------------------------------------------
  # Views, loss and the teacher update.
  # ----------------------------------------------------------------------------
  @classmethod
  def view_specs(cls, config: ml_collections.ConfigDict) -> tuple[ViewSpec, ...]:
    """2 global crops and `num_local_crops` local crops of the whole image, each maybe flipped."""
    # DataAugmentationDINO (facebookresearch/dino main_dino.py): each crop is
    # RandomResizedCrop(size, scale, bicubic) of the decoded image (lines 436,
    # 443, 452; ratio: torchvision's default 3/4-4/3) then RandomHorizontalFlip
    # (p 0.5, line 422); global scale (0.4, 1), local (0.05, 0.4) (lines
    # 107-117). Its colour ops follow on device (`views`).
    a, interpolation = config.augment, config.data.interpolation
    shared = dict(crop_ratio=tuple(a.crop_ratio), flip_prob=a.flip_prob,
                  interpolation=interpolation)
    keys = {'crop_ratio': 'config.augment.crop_ratio', 'flip_prob': 'config.augment.flip_prob',
            'interpolation': 'config.data.interpolation'}
    specs = [ViewSpec('global_views', count=2, size=a.global_size,
                      crop_scale=tuple(a.global_crop_scale), **shared,
                      config_keys=dict(keys, size='config.augment.global_size',
                                       crop_scale='config.augment.global_crop_scale'))]
    if a.num_local_crops:
      specs.append(ViewSpec('local_views', count=a.num_local_crops, size=a.local_size,
                            crop_scale=tuple(a.local_crop_scale), **shared,
                            config_keys=dict(keys, size='config.augment.local_size',
                                             crop_scale='config.augment.local_crop_scale',
                                             count='config.augment.num_local_crops')))
    return tuple(specs)

  def views(self, batch: Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """The host crops, coloured and normalised: (B, 2, G, G, C) and (B, n, L, L, C) or None."""
    a = self.config.augment
    global_views, local_views = device_augment.dino_colour(
        rng, batch['global_views'], batch.get('local_views'),
        brightness=a.brightness, contrast=a.contrast, saturation=a.saturation, hue=a.hue,
        jitter_prob=a.jitter_prob, grayscale_prob=a.grayscale_prob,
        global_blur_probs=tuple(a.global_blur_probs),
        global_solarize_probs=tuple(a.global_solarize_probs),
        local_blur_prob=a.local_blur_prob, blur_sigma=tuple(a.blur_sigma),
        blur_kernel_size=a.blur_kernel_size)
    mean, std = self.config.data.mean, self.config.data.std
    return (standardize(global_views, mean, std),
            None if local_views is None else standardize(local_views, mean, std))

  def loss_fn(self, model: DINOModel, batch: Batch, rng: jax.Array,
              step: jax.Array) -> tuple[jax.Array, Metrics]:
    """dino_loss of student vs teacher; updates the center in place (kept by the trainer)."""
    m = self.config.model
    rng, drop_path_key = jax.random.split(rng)
    global_views, local_views = self.views(batch, rng)
    crops = [global_views] + ([] if local_views is None else [local_views])
    teacher = jax.lax.stop_gradient(model.teacher([global_views]))  # (2, B, K), no drop path
    student = model.student(crops, drop_path_key=drop_path_key)  # (2 + n, B, K)
    temperature = self.teacher_temperature(step)
    center = model.center[...]
    loss = losses.dino_loss(student, teacher, center, m.student_temp, temperature)
    # The center moves after the loss used it (DINOLoss.forward, then update_center).
    model.center[...] = losses.dino_center(center, teacher, m.center_momentum)
    entropy, batch_entropy = teacher_entropies(teacher, center, temperature)
    return loss, {
        'teacher_entropy': entropy,
        'teacher_batch_entropy': batch_entropy,
        # Each teacher view meets the same S - 1 student views, so the mean
        # cross-entropy is the mean teacher entropy plus the mean KL.
        'kl_teacher_student': loss - entropy,
        'teacher_temp': temperature,
        'teacher_momentum': self.teacher_momentum(step),
        'weight_decay': _weight_decay_at(self.config.optim, step),
        'center_norm': jnp.linalg.norm(center),
    }

  def after_step(self, model: DINOModel, step: jax.Array) -> None:
    """teacher <- m * teacher + (1 - m) * student, m on its cosine schedule."""
    momentum = self.teacher_momentum(step)
    teacher = nnx.state(model.teacher, TeacherWeight)
    student = nnx.to_pure_dict(nnx.state(model.student, nnx.Param))
    updated = jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s,
                           nnx.to_pure_dict(teacher), student)
    nnx.replace_by_pure_dict(teacher, updated)
    nnx.update(model.teacher, teacher)

  def check_metrics(self, scalars: dict[str, float]) -> list[str]:
    """Warnings for the log when the teacher's outputs look collapsed."""
    return collapse_warnings(scalars, self.config.model.out_dim)

  def train_flops_per_example(self) -> float:
    """Model FLOPs of one image's step, for MFU (`ssl_jax.flops.dino_train_flops`)."""
    return flops.dino_train_flops(self.config)

  # ----------------------------------------------------------------------------
  # Export, probing and pictures: the teacher is the model DINO evaluates.
  # ----------------------------------------------------------------------------
  def encoder(self, model: DINOModel) -> ViT:
    """The teacher's ViT backbone, as an ordinary ViT (its weights as nnx.Param)."""
    return retyped(model.teacher.backbone, TeacherWeight, nnx.Param)

  def features(self, encoder: ViT, images: jax.Array) -> jax.Array:
    """uint8 images -> the [CLS] token after the final norm (DINO's kNN feature)."""
    images = normalize(images, self.config.data.mean, self.config.data.std)
    return encoder(images)['cls'].astype(jnp.float32)

  def visualize(self, model: DINOModel, batch: Batch, rng: jax.Array):
    """The first global crop of 8 images (no colour ops) and the teacher's [CLS] attention."""
    del rng
    images = normalize(batch['global_views'][:8, 0], self.config.data.mean, self.config.data.std)
    attention = model.teacher.backbone(images)['attention']  # (8, heads, 1+L, 1+L)
    grid = images.shape[1] // self.config.model.patch_size
    cls_attention = attention[:, :, 0, 1:].astype(jnp.float32)
    return {'images': images,
            'attention': cls_attention.reshape(*cls_attention.shape[:2], grid, grid)}

  def render(self, arrays) -> np.ndarray:
    """One row per image: the image, then one heat map per head, each min-max scaled."""
    images = denormalize(np.asarray(arrays['images']), self.config.data.mean,
                         self.config.data.std)  # (N, H, W, C)
    attention = np.asarray(arrays['attention'], np.float32)  # (N, heads, g, g)
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    upsample = images.shape[1] // attention.shape[-1]
    maps = attention.repeat(upsample, axis=2).repeat(upsample, axis=3)
    # Each map from its least to its most attended patch: with few patches the
    # weights are close to uniform, and a scale from 0 would show little.
    low = maps.min(axis=(2, 3), keepdims=True)
    maps = (maps - low) / np.maximum(maps.max(axis=(2, 3), keepdims=True) - low, 1e-12)
    return image_grid(np.concatenate([images[:, None], heat_map(maps)], axis=1))


def teacher_entropies(teacher: jax.Array, center: jax.Array,
                      temperature: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean entropy of each teacher target, entropy of the batch-mean target), in nats.

  The first is log(out_dim) when the targets are uniform (collapse through
  too much centering); the second is ~0 when every example's target puts its
  mass on the same dimension (collapse through too much sharpening).
  """
  log_probs = jax.nn.log_softmax((teacher.astype(jnp.float32) - center) / temperature, axis=-1)
  probs = jnp.exp(log_probs)
  entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
  mean_probs = jnp.mean(probs.reshape(-1, probs.shape[-1]), axis=0)
  batch_entropy = -jnp.sum(mean_probs * jnp.log(jnp.maximum(mean_probs, 1e-30)))
  return entropy, batch_entropy


# Fractions of log(out_dim) that count as collapsed.
UNIFORM_COLLAPSE = 0.95
ONE_DIMENSION_COLLAPSE = 0.05


def collapse_warnings(scalars: dict[str, float], out_dim: int) -> list[str]:
  """Warning lines when the teacher entropies approach log(out_dim) or 0."""
  warnings, maximum = [], math.log(out_dim)
  entropy = scalars.get('teacher_entropy')
  batch_entropy = scalars.get('teacher_batch_entropy')
  if entropy is not None and entropy > UNIFORM_COLLAPSE * maximum:
    warnings.append(
        f'DINO collapse warning: teacher entropy {entropy:.3f} is within '
        f'{1 - UNIFORM_COLLAPSE:.0%} of log(out_dim) = {maximum:.3f}: the targets are '
        'nearly uniform (too much centering; try a lower teacher_temp or more momentum).')
  if batch_entropy is not None and batch_entropy < ONE_DIMENSION_COLLAPSE * maximum:
    warnings.append(
        f'DINO collapse warning: the batch-mean teacher target has entropy '
        f'{batch_entropy:.3f} (log(out_dim) = {maximum:.3f}): every image is mapped to '
        'the same few dimensions (too much sharpening; check the center and teacher_temp).')
  return warnings


def heat_map(values: np.ndarray) -> np.ndarray:
  """Values in [0, 1] (...) -> uint8 (..., 3) colours on a black-red-yellow-white scale."""
  values = np.clip(values, 0.0, 1.0)[..., None]
  rgb = np.clip(3.0 * values - np.array([0.0, 1.0, 2.0]), 0.0, 1.0)
  return np.round(255 * rgb).astype(np.uint8)


def _weight_decay_at(optim_config, step: jax.Array) -> jax.Array:
  """The weight decay the optimizer applies at `step` (a schedule or a constant)."""
  weight_decay = optim.weight_decay_schedule(optim_config)
  return jnp.asarray(weight_decay(step) if callable(weight_decay) else weight_decay,
                     jnp.float32)
