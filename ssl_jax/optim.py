"""Optimizers and learning-rate schedules built from `config.optim`.

Keys: `name` (adamw | lars | sgd), `lr` (the base learning rate), `lr_scaling`
('linear': peak lr = lr * global batch / 256, the convention of the MAE,
SimCLR and DINO papers; 'sqrt': lr * sqrt(global batch), SimCLR's option for
small batches and fine-tuning; 'none': peak lr = lr), `schedule`
(warmup_cosine | warmup_linear | constant), `warmup_steps` / `warmup_epochs`,
`min_lr`, `weight_decay`, `b1`, `b2`, `eps`, `momentum`, `trust_coefficient`
(LARS), `grad_clip_norm` (0 = off).

For DINO-style recipes, all neutral by default: `weight_decay_end` (None: a
constant `weight_decay`; else a cosine from `weight_decay` to it over
`weight_decay_steps` steps), `grad_clip_scope` ('global' norm, or
'per_parameter' as DINO's utils.clip_gradients), and `freeze_steps` (0 = off)
with `freeze_module` (adamw only): parameters under a module of that name get
no update at all, not even weight decay, for the first `freeze_steps` steps.

For fine-tuning: `layer_decay` (None = off), the layer-wise lr decay of
BEiT / MAE (`layer_decay_scales`), which also exempts the [CLS] token and the
position embedding from weight decay, as MAE's param_groups_lrd does.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax.errors import ConfigError

LR_REFERENCE_BATCH = 256


def peak_learning_rate(optim: ml_collections.ConfigDict, batch_size: int) -> float:
  """The learning rate reached after warmup, after batch-size scaling."""
  if optim.lr_scaling == 'linear':
    return optim.lr * batch_size / LR_REFERENCE_BATCH
  if optim.lr_scaling == 'sqrt':  # simclr tf2/model.py L94-95: lr * sqrt(batch).
    return optim.lr * math.sqrt(batch_size)
  if optim.lr_scaling == 'none':
    return optim.lr
  raise ConfigError(f"config.optim.lr_scaling={optim.lr_scaling!r}: expected 'linear', 'sqrt' "
                    "or 'none'")


def learning_rate_schedule(optim: ml_collections.ConfigDict, peak_lr: float,
                           total_steps: int) -> optax.Schedule:
  """Per-step schedule: linear warmup from 0, then cosine / linear decay to min_lr."""
  warmup = int(optim.warmup_steps)
  if optim.schedule == 'constant':
    return optax.constant_schedule(peak_lr)
  if warmup > total_steps:
    raise ConfigError(
        f'config.optim: {warmup} warmup steps exceed the {total_steps} training steps')
  if optim.schedule == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup,
        decay_steps=total_steps, end_value=optim.min_lr)
  if optim.schedule == 'warmup_linear':
    return optax.join_schedules([
        optax.linear_schedule(0.0, peak_lr, warmup),
        optax.linear_schedule(peak_lr, optim.min_lr, total_steps - warmup)], [warmup])
  raise ConfigError(f'config.optim.schedule={optim.schedule!r}: expected warmup_cosine, '
                   'warmup_linear or constant')


# Parameters under a module of this name form an online probe (a classifier on
# stop-gradient features, trained alongside): never decayed or LARS-adapted.
PROBE_MODULE = 'online_probe'


def decay_mask(params):
  """Weight decay (and LARS adaptation) on kernels only; biases, norms, probes exempt.

  The MAE/timm rule (`optim_factory.add_weight_decay`) exempts 1-D parameters
  and biases; tokens of shape (1, 1, D) are decayed, as in MAE pretraining. A
  bias is exempt whatever its rank: the fused qkv bias is (3, heads, head_dim)
  here but a 1-D vector in PyTorch. SimCLR's LARS
  (`exclude_from_weight_decay=['batch_normalization', 'bias', 'head_supervised']`)
  is the same rule plus the supervised probe.
  """
  def decayed(path, param):
    names = [getattr(key, 'key', None) for key in path]
    return param.ndim > 1 and PROBE_MODULE not in names and 'bias' not in names
  return jax.tree_util.tree_map_with_path(decayed, params)


# MAE's fine-tuning `no_weight_decay_list` (timm VisionTransformer.no_weight_decay).
NO_DECAY_TOKENS = ('cls_token', 'pos_embed')


def _names(path) -> list:
  return [getattr(key, 'key', getattr(key, 'idx', None)) for key in path]


def finetune_decay_mask(params):
  """`decay_mask`, also exempting the [CLS] token and position embedding (MAE fine-tuning).

  mae util/lr_decay.py L32: no decay for 1-D parameters and the model's
  `no_weight_decay()` names, which timm's ViT gives as {pos_embed, cls_token}.
  """
  decayed = decay_mask(params)
  return jax.tree_util.tree_map_with_path(
      lambda path, keep: keep and not set(_names(path)) & set(NO_DECAY_TOKENS), decayed)


EMBEDDINGS = ('patch_embed', *NO_DECAY_TOKENS)


def vit_layer_id(path, num_layers: int) -> int:
  """MAE's get_layer_id_for_vit (util/lr_decay.py L64-76) on a parameter's tree path.

  0 for the patch embedding, [CLS] token and position embedding; i + 1 for
  anything under block i (`.../blocks/i/...`); `num_layers` (= blocks + 1) for
  the rest: the final norms and the head. Works on a ViT's tree or on a
  model holding one (`encoder/patch_embed/...`).
  """
  names = _names(path)
  if 'blocks' in names:
    return int(names[names.index('blocks') + 1]) + 1
  if set(names) & set(EMBEDDINGS):
    return 0
  return num_layers


def layer_decay_scales(params, layer_decay: float):
  """Per-parameter lr scale layer_decay ** (num_layers - layer_id) (mae util/lr_decay.py L25).

  num_layers = blocks + 1 (L23), so block i gets decay ** (depth - i), the
  embeddings decay ** (depth + 1) and the head 1. The depth is the number of
  distinct block indices in the tree (it holds one ViT).
  """
  blocks = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = _names(path)
    if 'blocks' in names:
      blocks.add(names[names.index('blocks') + 1])
  num_layers = len(blocks) + 1
  return jax.tree_util.tree_map_with_path(
      lambda path, _: layer_decay ** (num_layers - vit_layer_id(path, num_layers)), params)


def scale_by_layer_decay(layer_decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its `layer_decay_scales` entry (after the optimizer).

  MAE's util/lr_sched.py sets each group's lr to lr * lr_scale, and torch's
  AdamW decays weights by that group lr, so the whole update (decay included)
  scales: exactly this transformation chained after AdamW. Stateless, so a
  resumed run's optimizer state has the same structure.
  """
  def update(updates, state, params=None):
    del params
    scales = layer_decay_scales(updates, layer_decay)
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def weight_decay_schedule(optim: ml_collections.ConfigDict) -> float | optax.Schedule:
  """`weight_decay`, or DINO's cosine from it to `weight_decay_end` (utils.cosine_scheduler).

  DINO's `end + 0.5 (start - end) (1 + cos(pi t / T))`, held at `end` after T:
  optax's cosine decay of the gap `start - end`, shifted by `end` (optax's own
  `alpha = end / start` form would divide by a zero `weight_decay`).
  """
  if optim.weight_decay_end is None:
    return optim.weight_decay
  if not optim.weight_decay_steps or optim.weight_decay_steps < 1:
    raise ConfigError('config.optim.weight_decay_end needs config.optim.weight_decay_steps, '
                      f'the length of the cosine in steps (got {optim.weight_decay_steps})')
  start, end = optim.weight_decay, optim.weight_decay_end
  gap = optax.cosine_decay_schedule(start - end, int(optim.weight_decay_steps))
  return lambda step: end + gap(step)


def clip_by_parameter_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales each parameter's gradient to L2 norm <= max_norm (DINO's clip_gradients)."""
  def clip(updates, state, params=None):
    del params
    def one(g):
      coefficient = max_norm / (jnp.linalg.norm(g) + 1e-6)  # The reference's epsilon.
      return g * jnp.minimum(coefficient, 1.0).astype(g.dtype)
    return jax.tree.map(one, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), clip)


def frozen_labels(params, module: str):
  """'frozen' for parameters under a module named `module` (DINO's `last_layer`), else 'trained'."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'frozen' if any(getattr(key, 'key', None) == module for key in path)
      else 'trained', params)


def _named_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule,
                     weight_decay: float | optax.Schedule) -> optax.GradientTransformation:
  if optim.get('layer_decay') is not None:
    if optim.name != 'adamw':
      raise ConfigError(f'config.optim.layer_decay is implemented for adamw, not {optim.name!r}')
    return optax.chain(
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=weight_decay, mask=finetune_decay_mask),
        scale_by_layer_decay(optim.layer_decay))
  if optim.name == 'adamw':
    return optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=weight_decay, mask=decay_mask)
  if optim.name == 'lars':
    # You et al. 2017 as SimCLR uses it: decay, then the layer-wise trust ratio
    # eta * |w| / |g|, then momentum; both skip the parameters decay_mask exempts.
    return optax.lars(schedule, weight_decay=weight_decay, weight_decay_mask=decay_mask,
                      trust_coefficient=optim.trust_coefficient, eps=0.0,
                      trust_ratio_mask=decay_mask, momentum=optim.momentum)
  if optim.name == 'sgd':
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                       optax.sgd(schedule, momentum=optim.momentum or None))
  raise ConfigError(f'config.optim.name={optim.name!r}: expected adamw, lars or sgd')


def _frozen_at_first(optim: ml_collections.ConfigDict, schedule: optax.Schedule,
                     weight_decay: float | optax.Schedule,
                     freeze_steps: int) -> optax.GradientTransformation:
  """AdamW on the `freeze_module` parameters that skips them entirely for `freeze_steps` steps.

  DINO's cancel_gradients_last_layer sets these gradients to None during the
  first epoch, so torch's AdamW skips the parameters: no moments, no decay,
  and no step count, since torch counts steps per tensor and a thawed layer
  starts its bias correction 1 - b^t at t = 1 (one global count would use
  t = F + 1 and take up to ~6x larger steps for hundreds of steps).
  `optax.conditionally_mask` is exactly that: a zero update and an untouched
  inner state while the condition is false. Its inner AdamW therefore counts
  from the thaw, so the lr and weight-decay schedules are shifted by
  `freeze_steps` to stay on the global step.
  """
  def shifted(value):
    return (lambda count: value(count + freeze_steps)) if callable(value) else value

  return optax.conditionally_mask(
      _named_optimizer(optim, shifted(schedule), shifted(weight_decay)),
      lambda step: step >= freeze_steps)


def build_optimizer(optim: ml_collections.ConfigDict,
                    schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optax chain named by `config.optim.name`, with optional clipping and freezing."""
  weight_decay = weight_decay_schedule(optim)
  freeze_steps = int(round(optim.freeze_steps or 0))
  tx = _named_optimizer(optim, schedule, weight_decay)
  if freeze_steps > 0:
    if optim.name != 'adamw':
      raise ConfigError(f'config.optim.freeze_steps is implemented for adamw, not {optim.name!r}')
    tx = optax.partition(
        {'trained': tx,
         'frozen': _frozen_at_first(optim, schedule, weight_decay, freeze_steps)},
        lambda params: frozen_labels(params, optim.freeze_module))
  if optim.grad_clip_norm:
    if optim.grad_clip_scope == 'global':
      clip = optax.clip_by_global_norm(optim.grad_clip_norm)
    elif optim.grad_clip_scope == 'per_parameter':
      clip = clip_by_parameter_norm(optim.grad_clip_norm)
    else:
      raise ConfigError(f'config.optim.grad_clip_scope={optim.grad_clip_scope!r}: expected '
                        "'global' or 'per_parameter'")
    tx = optax.chain(clip, tx)
  return tx
