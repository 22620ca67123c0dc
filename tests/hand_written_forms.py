"""The hand-written forms that library calls replaced (issue 12), kept as test oracles.

Each is the code as it stood in ssl_jax before the replacement; the tests
assert that the optax form gives the same numbers.
"""

import math
import pathlib

import jax
import jax.numpy as jnp


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
