"""Pretext losses as pure functions of arrays.

Every function here is framework-free (no Flax), jit-able, and does its
arithmetic in float32 whatever the input dtype. The formulas and their
conventions are stated in ../shared/DESIGN.md; tests compare each one with an
independent NumPy implementation of the paper's formula.
"""

import jax
import jax.numpy as jnp
import optax
from einops import rearrange


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """NHWC images -> (B, L, patch*patch*C) patches in row-major grid order.

  Each patch is flattened as (row, col, channel), the order of the MAE
  reference code (`einsum('nchpwq->nhwpqc')`), so decoder outputs and
  pixel targets line up with PyTorch MAE checkpoints.
  """
  _, height, width, _ = images.shape
  if height % patch or width % patch:
    raise ValueError(
        f'patchify: image size {height}x{width} is not divisible by the '
        f'patch size {patch}.')
  return rearrange(images, 'b (h p) (w q) c -> b (h w) (p q c)', p=patch, q=patch)


def unpatchify(patches: jax.Array, patch: int, height: int, width: int) -> jax.Array:
  """Inverse of `patchify`: (B, L, patch*patch*C) -> (B, H, W, C)."""
  return rearrange(patches, 'b (h w) (p q c) -> b (h p) (w q) c',
                   h=height // patch, w=width // patch, p=patch, q=patch)


def mae_loss(pred: jax.Array, target: jax.Array, mask: jax.Array,
             norm_pix_loss: bool = True) -> jax.Array:
  """Mean squared error on masked patches only (He et al. 2021, Sec. 3).

  Args:
    pred: (B, L, D) predicted patch pixels.
    target: (B, L, D) true patch pixels, e.g. `patchify(images, p)`.
    mask: (B, L), 1 where the patch was removed from the encoder's input.
    norm_pix_loss: normalise each target patch by its own mean and unbiased
      variance (+1e-6), as the paper's code does (`target.var(dim=-1)` in
      PyTorch is unbiased).

  Returns:
    The scalar loss: per-patch mean over D, then mean over masked patches.
  """
  pred = pred.astype(jnp.float32)
  target = target.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  per_patch = jnp.mean(jnp.square(pred - target), axis=-1)  # (B, L)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def ntxent_loss(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
  """SimCLR's NT-Xent (Chen et al. 2020, eq. 1), mean over all 2N anchors.

  Row i of `z1` and row i of `z2` are two views of one example; for anchor
  z1[i] the positive is z2[i] and the 2N - 2 other rows of both views are
  negatives (and symmetrically for z2[i]). Similarity is cosine similarity
  divided by `temperature`. Under `jit` with a batch sharded over devices the
  (2N, 2N) similarity matrix spans the global batch, so every example on
  every device is a negative: no explicit all-gather is needed.

  Args:
    z1: (N, D) projections of the first views.
    z2: (N, D) projections of the second views.
    temperature: the softmax temperature tau.

  Returns:
    The scalar loss. (The SimCLR code reports the sum of the two views' means,
    twice this value.)
  """
  z = jnp.concatenate([z1, z2]).astype(jnp.float32)  # (2N, D)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  num = z1.shape[0]
  logits = z @ z.T / temperature  # (2N, 2N)
  logits = jnp.where(jnp.eye(2 * num, dtype=bool), -jnp.inf, logits)  # No self-pairs.
  positive = jnp.concatenate([jnp.arange(num, 2 * num), jnp.arange(num)])  # (2N,)
  positive_logits = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive_logits)


def dino_loss(student: jax.Array, teacher: jax.Array, center: jax.Array,
              student_temp: float | jax.Array, teacher_temp: float | jax.Array) -> jax.Array:
  """DINO's self-distillation cross-entropy (Caron et al. 2021, Sec. 3.1, eq. 2-3).

  Follows `DINOLoss.forward` of facebookresearch/dino (main_dino.py): the
  teacher distribution is centred and sharpened, softmax((t - center) /
  teacher_temp), and is a constant (stop-gradient); every teacher view v is
  compared with every student view s != v, each pair's cross-entropy is
  averaged over the batch, and the pairs are averaged. The student's global
  crops come first, so student view i and teacher view i are the same crop.
  Under `jit` with a sharded batch the batch mean is the global one.

  Args:
    student: (S, B, D) student outputs, the T global crops first, then the
      local crops.
    teacher: (T, B, D) teacher outputs of the global crops.
    center: (D,) or (1, D) running center of the teacher outputs.
    student_temp: the student's softmax temperature (0.1 in the paper).
    teacher_temp: the teacher's softmax temperature (0.04 -> 0.07).

  Returns:
    The scalar loss: mean over the T * (S - 1) pairs (t, s), t != s.
  """
  num_student, num_teacher = student.shape[0], teacher.shape[0]
  if num_teacher > num_student or student.shape[1:] != teacher.shape[1:]:
    raise ValueError(f'dino_loss: student {student.shape} must be (S, B, D) and teacher '
                     f'{teacher.shape} (T, B, D) with T <= S (global crops first).')
  log_student = jax.nn.log_softmax(student.astype(jnp.float32) / student_temp, axis=-1)
  centred = jax.lax.stop_gradient(teacher.astype(jnp.float32) - center.astype(jnp.float32))
  teacher_probs = jax.nn.softmax(centred / teacher_temp, axis=-1)  # (T, B, D)
  # (T, S) batch-mean cross-entropies of every (teacher view, student view) pair.
  # HIGHEST: on TPU a default float32 matmul rounds its inputs to bfloat16.
  cross_entropy = -jnp.einsum('tbd,sbd->ts', teacher_probs, log_student,
                              precision=jax.lax.Precision.HIGHEST) / student.shape[1]
  other_view = 1.0 - jnp.eye(num_teacher, num_student, dtype=jnp.float32)
  return jnp.sum(cross_entropy * other_view) / (num_teacher * (num_student - 1))


def dino_center(center: jax.Array, teacher: jax.Array, momentum: float | jax.Array) -> jax.Array:
  """EMA of the batch mean of raw teacher outputs (DINOLoss.update_center).

  Args:
    center: (1, D) (or (D,)) current center.
    teacher: (T, B, D) teacher outputs of the global crops (not centred).
    momentum: the EMA rate (0.9 in the paper).

  Returns:
    The new center, shaped and typed like `center` in float32:
    center * momentum + mean(teacher) * (1 - momentum), the mean over all T * B
    rows; under `jit` with a sharded batch that mean spans every device, as the
    reference's all_reduce does.
  """
  teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  batch_center = jnp.mean(teacher.reshape(-1, teacher.shape[-1]), axis=0)  # (D,)
  center = center.astype(jnp.float32)
  return center * momentum + batch_center.reshape(center.shape) * (1.0 - momentum)


def _weighted_token_cross_entropy(logits: jax.Array, labels: jax.Array,
                                  weights: jax.Array) -> jax.Array:
  """Sum of weights * CE(logits, labels) over tokens, divided by the sum of weights.

  The per-token CE is optax's, with `where` leaving out (as exactly 0) the
  tokens of weight 0. Their labels may hold anything (padding, -100): they
  are replaced by 0 before the gather, so they never produce a NaN. With no
  counted token the result is 0 with zero (not NaN) gradients.
  """
  logits = logits.astype(jnp.float32)  # (B, T, V)
  weights = weights.astype(jnp.float32)  # (B, T)
  counted = weights > 0
  labels = jnp.where(counted, labels, 0).astype(jnp.int32)  # (B, T)
  cross_entropy = optax.losses.softmax_cross_entropy_with_integer_labels(
      logits, labels, where=counted)  # (B, T)
  count = jnp.sum(weights)
  return jnp.sum(cross_entropy * weights) / jnp.maximum(count, 1e-8)


def next_token_loss(logits: jax.Array, tokens: jax.Array,
                    weights: jax.Array | None = None) -> jax.Array:
  """GPT's objective: mean cross-entropy of `logits[:, t]` against `tokens[:, t+1]`.

  Args:
    logits: (B, T, V) the model's outputs for the input `tokens`, or
      (B, T-1, V), those of the positions that have a target: the last
      position's logits are never read, so a caller may skip computing them.
    tokens: (B, T) int the input tokens; the targets are the same tokens
      shifted left by one, so the last position has no target.
    weights: optional (B, T), aligned with `tokens`: `weights[:, t]` weighs
      the prediction *of* `tokens[:, t]` (made at position t-1), so padding
      marked 0 there never counts as a target; `weights[:, 0]` is unused.
      None counts every target.

  Returns:
    The scalar mean over counted targets (0 if none counts).
  """
  batch, length = tokens.shape
  if logits.shape[:2] not in ((batch, length), (batch, length - 1)):
    raise ValueError(f'next_token_loss: logits {logits.shape} do not match tokens '
                     f'{tokens.shape} in (B, T) or (B, T-1).')
  targets = tokens[:, 1:]  # (B, T-1)
  weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights[:, 1:]
  return _weighted_token_cross_entropy(logits[:, :length - 1], targets, weights)


def masked_lm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """BERT's objective: mean cross-entropy over positions whose weight is 1.

  Args:
    logits: (B, T, V) the model's outputs on the corrupted input.
    labels: (B, T) int the original tokens; read only where `weights` > 0.
    weights: (B, T) 1 at the positions chosen for prediction, 0 elsewhere
      (unchosen tokens and padding).

  Returns:
    The scalar mean over chosen positions (0 if none is chosen).
  """
  if logits.shape[:2] != labels.shape or labels.shape != weights.shape:
    raise ValueError(f'masked_lm_loss: logits {logits.shape}, labels {labels.shape} and '
                     f'weights {weights.shape} must agree in (B, T).')
  return _weighted_token_cross_entropy(logits, labels, weights)
