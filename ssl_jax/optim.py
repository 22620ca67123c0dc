"""Optimizers and learning-rate schedules built from `config.optim`.

Keys: `name` (adamw | lars | sgd), `lr` (the base learning rate), `lr_scaling`
('linear': peak lr = lr * global batch / 256, the convention of the MAE,
SimCLR and DINO papers; 'none': peak lr = lr), `schedule`
(warmup_cosine | warmup_linear | constant), `warmup_steps` / `warmup_epochs`,
`min_lr`, `weight_decay`, `b1`, `b2`, `eps`, `momentum`, `trust_coefficient`
(LARS), `grad_clip_norm` (0 = off).
"""

import jax
import ml_collections
import optax

from ssl_jax.errors import ConfigError

LR_REFERENCE_BATCH = 256


def peak_learning_rate(optim: ml_collections.ConfigDict, batch_size: int) -> float:
  """The learning rate reached after warmup, after batch-size scaling."""
  if optim.lr_scaling == 'linear':
    return optim.lr * batch_size / LR_REFERENCE_BATCH
  if optim.lr_scaling == 'none':
    return optim.lr
  raise ConfigError(f"config.optim.lr_scaling={optim.lr_scaling!r}: expected 'linear' or 'none'")


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

  The MAE/timm rule (`optim_factory.add_weight_decay`) exempts 1-D parameters;
  tokens of shape (1, 1, D) are decayed, as in MAE pretraining. SimCLR's LARS
  (`exclude_from_weight_decay=['batch_normalization', 'bias', 'head_supervised']`)
  is the same rule plus the supervised probe.
  """
  def decayed(path, param):
    in_probe = any(getattr(key, 'key', None) == PROBE_MODULE for key in path)
    return param.ndim > 1 and not in_probe
  return jax.tree_util.tree_map_with_path(decayed, params)


def build_optimizer(optim: ml_collections.ConfigDict,
                    schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optax chain named by `config.optim.name`, with optional gradient clipping."""
  if optim.name == 'adamw':
    tx = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                     weight_decay=optim.weight_decay, mask=decay_mask)
  elif optim.name == 'lars':
    # You et al. 2017 as SimCLR uses it: decay, then the layer-wise trust ratio
    # eta * |w| / |g|, then momentum; both skip the parameters decay_mask exempts.
    tx = optax.lars(schedule, weight_decay=optim.weight_decay, weight_decay_mask=decay_mask,
                    trust_coefficient=optim.trust_coefficient, eps=0.0,
                    trust_ratio_mask=decay_mask, momentum=optim.momentum)
  elif optim.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=optim.momentum or None))
  else:
    raise ConfigError(f'config.optim.name={optim.name!r}: expected adamw, lars or sgd')
  if optim.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
  return tx


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.optim` block with its defaults (AdamW, warmup + cosine)."""
  optim = ml_collections.ConfigDict({
      'name': 'adamw',
      'lr': 1e-3,
      'lr_scaling': 'linear',
      'schedule': 'warmup_cosine',
      'warmup_steps': ml_collections.config_dict.placeholder(int),
      'warmup_epochs': ml_collections.config_dict.placeholder(float),
      'min_lr': 0.0,
      'weight_decay': 0.0,
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-8,
      'momentum': 0.9,
      'trust_coefficient': 0.001,  # LARS eta.
      'grad_clip_norm': 0.0,
  })
  optim.update(overrides)
  return optim
