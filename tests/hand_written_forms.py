"""The hand-written forms that library calls replaced (issue 12), kept as test oracles.

Each is the code as it stood in ssl_jax before the replacement; the tests
assert that the optax form gives the same numbers.
"""

import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssl_jax import optim


# ------------------------------------------------------------------------------
# Schedules: ssl_jax/methods/dino.py and ssl_jax/optim.py.
# ------------------------------------------------------------------------------
def teacher_temperature(step, *, start: float, end: float, warmup_steps: int):
  """Linear from `start` to `end` over `warmup_steps`, then `end` (DINOLoss's warmup)."""
  progress = jnp.minimum(step / max(warmup_steps, 1), 1.0)
  return start + (end - start) * progress


def teacher_momentum(step, *, start: float, total_steps: int):
  """Cosine from `start` at step 0 to 1 at `total_steps` (utils.cosine_scheduler(m, 1))."""
  progress = jnp.minimum(step / max(total_steps, 1), 1.0)
  return 1.0 - 0.5 * (1.0 - start) * (1.0 + jnp.cos(math.pi * progress))


def weight_decay_cosine(start: float, end: float, steps: int):
  """DINO's weight-decay cosine from `start` to `end` over `steps`, then `end`."""
  def schedule(step):
    progress = jnp.minimum(step, steps) / steps
    return end + 0.5 * (start - end) * (1.0 + jnp.cos(math.pi * progress))
  return schedule


# ------------------------------------------------------------------------------
# Masked token cross-entropy: ssl_jax/losses.py.
# ------------------------------------------------------------------------------
def weighted_token_cross_entropy(logits, labels, weights):
  """Sum of weights * CE(logits, labels) over tokens, divided by the sum of weights."""
  logits = logits.astype(jnp.float32)  # (B, T, V)
  weights = weights.astype(jnp.float32)  # (B, T)
  labels = jnp.where(weights > 0, labels, 0).astype(jnp.int32)  # (B, T)
  label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  cross_entropy = jax.nn.logsumexp(logits, axis=-1) - label_logits  # (B, T)
  count = jnp.sum(weights)
  return jnp.sum(cross_entropy * weights) / jnp.maximum(count, 1e-8)


# ------------------------------------------------------------------------------
# The newest checkpoint: ssl_jax/checkpoint.py.
# ------------------------------------------------------------------------------
def latest_saved_step(workdir):
  """The largest all-digit directory name in `workdir/checkpoints`, or None."""
  directory = pathlib.Path(workdir) / 'checkpoints'
  if not directory.is_dir():
    return None
  return max((int(p.name) for p in directory.iterdir() if p.name.isdigit()), default=None)


# ------------------------------------------------------------------------------
# DINO's frozen last layer: ssl_jax/optim.py.
# ------------------------------------------------------------------------------
def frozen_mask(params, module: str):
  """True for parameters under a module named `module` (e.g. DINO's `last_layer`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(key, 'key', None) == module for key in path), params)


class LateStartAdamState(NamedTuple):
  """State of `scale_by_adam_late_start`: optax's Adam state."""
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def scale_by_adam_late_start(b1: float, b2: float, eps: float, late_mask,
                             start_step: int) -> optax.GradientTransformation:
  """optax.scale_by_adam, but the leaves marked by `late_mask` count steps from `start_step`."""
  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return LateStartAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    count = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)

    def step(m, v, late):
      t = jnp.maximum(count - start_step, 1) if late else count
      m_hat = m / (1 - b1 ** t.astype(m.dtype))
      v_hat = v / (1 - b2 ** t.astype(v.dtype))
      return m_hat / (jnp.sqrt(v_hat) + eps)
    return jax.tree.map(step, mu, nu, late_mask(params)), LateStartAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def zero_while(mask, steps: int) -> optax.GradientTransformation:
  """Sets the updates of the leaves marked by `mask` to 0 during the first `steps` calls."""
  def update(updates, state, params=None):
    frozen = state.count < steps
    updates = jax.tree.map(lambda u, f: jnp.where(frozen, 0.0, u).astype(u.dtype) if f else u,
                           updates, mask(params))
    return updates, optax.ScaleByScheduleState(optax.safe_increment(state.count))
  return optax.GradientTransformation(
      lambda params: optax.ScaleByScheduleState(jnp.zeros([], jnp.int32)), update)


def frozen_adamw(optim_config: ml_collections.ConfigDict,
                 schedule: optax.Schedule) -> optax.GradientTransformation:
  """The former `build_optimizer` for adamw with `freeze_steps` > 0 (no clipping)."""
  weight_decay = optim_config.weight_decay
  if optim_config.weight_decay_end is not None:
    weight_decay = weight_decay_cosine(weight_decay, optim_config.weight_decay_end,
                                       int(optim_config.weight_decay_steps))
  freeze_steps = int(round(optim_config.freeze_steps))

  def frozen(params):
    return frozen_mask(params, optim_config.freeze_module)
  return optax.chain(
      zero_while(frozen, freeze_steps),
      scale_by_adam_late_start(optim_config.b1, optim_config.b2, optim_config.eps, frozen,
                               freeze_steps),
      optax.add_decayed_weights(weight_decay, mask=optim.decay_mask),
      zero_while(frozen, freeze_steps),
      optax.scale_by_learning_rate(schedule))
