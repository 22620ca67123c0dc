"""Offline linear probe: logistic regression on frozen, standardised features.

The probe behind the "linear probe" numbers of MAE and SimCLR, at the scale
of an in-memory eval set: features are standardised with the train split's
statistics (MAE puts a BatchNorm without affine before its linear head for
the same reason), then a softmax classifier is fitted full-batch with Adam
and a little L2. Deterministic: zero init, no sampling.

`protocol_linear_probe` is the probe of `python -m ssl_jax.probe`: the MAE,
SimCLR or DINO protocol (configs/probe.py) with its optimizer, batch, epochs
and schedule from `ssl_jax.optim`, on precomputed frozen features.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssl_jax import optim as optim_lib
from ssl_jax.config_blocks import optim_config
from ssl_jax.errors import ConfigError


def linear_probe_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                          test_features: np.ndarray, test_labels: np.ndarray, *,
                          steps: int = 300, lr: float = 0.01,
                          weight_decay: float = 1e-4) -> float:
  """Test top-1 of a softmax classifier fitted to the train features."""
  mean = train_features.mean(axis=0)
  std = train_features.std(axis=0) + 1e-6
  train_x = jnp.asarray((train_features - mean) / std, jnp.float32)
  test_x = jnp.asarray((test_features - mean) / std, jnp.float32)
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  targets = jax.nn.one_hot(train_labels, num_classes)
  params = {'w': jnp.zeros((train_x.shape[1], num_classes)), 'b': jnp.zeros(num_classes)}
  tx = optax.adam(lr)

  def loss(params):
    logits = train_x @ params['w'] + params['b']
    ce = optax.softmax_cross_entropy(logits, targets).mean()
    return ce + 0.5 * weight_decay * jnp.sum(params['w'] ** 2)

  @jax.jit
  def fit(params):
    def step(carry, _):
      params, opt_state = carry
      updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), length=steps)
    return params

  params = fit(params)
  predictions = np.asarray((test_x @ params['w'] + params['b']).argmax(-1))
  return float(np.mean(predictions == test_labels))


# ------------------------------------------------------------------------------
# The papers' linear-probe protocols on precomputed frozen features
# (`python -m ssl_jax.probe`, protocols in configs/probe.py).
# ------------------------------------------------------------------------------
def batchnorm_without_affine(features: np.ndarray, mean: np.ndarray, var: np.ndarray,
                             eps: float) -> np.ndarray:
  """(x - mean) / sqrt(var + eps): torch's BatchNorm1d(affine=False) with these statistics.

  MAE's head is `BatchNorm1d(D, affine=False, eps=1e-6)` then the linear
  layer (mae main_linprobe.py line 222). There the statistics are each
  batch's in training and the running averages at test; here they are the
  whole train split's (biased variance, as BatchNorm's normalisation), the
  value those running averages tend to for frozen, un-augmented features.
  """
  return ((features - mean) / np.sqrt(var + eps)).astype(np.float32)


def protocol_optim(block: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `config.optim` block of `ssl_jax.optim` for a probe protocol `block`."""
  return optim_config(name=block.optimizer, lr=block.lr, lr_scaling=block.lr_scaling,
                      schedule='warmup_cosine', weight_decay=block.weight_decay,
                      momentum=block.momentum, trust_coefficient=block.trust_coefficient)


def probe_steps(num_train: int, block: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  """(batch size, steps per epoch, epochs, warmup steps) of the protocol on `num_train` rows.

  The batch is capped at the train split. The incomplete last batch of an
  epoch is dropped, as MAE's train loader does (main_linprobe.py line 178,
  `drop_last=True`); DINO's keeps it (eval_linear.py line 93): less than one
  batch an epoch apart. `min_steps` raises the number of epochs until the
  head takes at least that many steps (the protocols set it to the
  reference's step count on its own dataset, so a small split is not
  trained for a hundredth of the reference's updates); the warmup stays the
  same fraction of the run.
  """
  batch = min(int(block.batch_size), num_train)
  steps_per_epoch = num_train // batch
  epochs = max(int(block.epochs), math.ceil(int(block.get('min_steps') or 0) / steps_per_epoch))
  warmup = int(round(block.warmup_epochs * steps_per_epoch * epochs / int(block.epochs)))
  return batch, steps_per_epoch, epochs, warmup


def protocol_linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                          test_features: np.ndarray, test_labels: np.ndarray,
                          block: ml_collections.ConfigDict) -> dict[str, float]:
  """Test top-1 of a linear head trained with a paper's protocol on frozen features.

  `block` (configs/probe.py): `feature_norm` ('batchnorm': MAE's BatchNorm
  without affine; 'none'), `optimizer` (lars | sgd, with `momentum`,
  `weight_decay`, `trust_coefficient` through `ssl_jax.optim`), `batch_size`,
  `epochs`, `lr` (scaled by batch / 256 when `lr_scaling='linear'`),
  `warmup_epochs` then a cosine to 0, `head_init_std` (0: zeros), `seed`.
  Returns `linear_top1` and the batch size and steps it used.
  """
  if block.feature_norm == 'batchnorm':
    mean, var = train_features.mean(axis=0), train_features.var(axis=0)
    train_features = batchnorm_without_affine(train_features, mean, var, block.bn_eps)
    test_features = batchnorm_without_affine(test_features, mean, var, block.bn_eps)
  elif block.feature_norm != 'none':
    raise ConfigError(f"feature_norm={block.feature_norm!r}: expected 'batchnorm' or 'none'")
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  params, batch, total = fit_protocol_head(train_features, train_labels, num_classes, block)
  logits = np.asarray(jnp.asarray(test_features) @ params['kernel'] + params['bias'])
  return {'linear_top1': float(np.mean(logits.argmax(-1) == test_labels)),
          'linear_batch_size': batch, 'linear_steps': total}


def fit_protocol_head(features: np.ndarray, labels: np.ndarray, num_classes: int,
                      block: ml_collections.ConfigDict, init: dict | None = None
                      ) -> tuple[dict, int, int]:
  """(head {'kernel', 'bias'}, batch size, steps) trained on (normalised) `features`.

  `init` (default: kernel ~ N(0, head_init_std), bias 0) starts the head.
  """
  batch, steps_per_epoch, epochs, warmup = probe_steps(len(features), block)
  total = steps_per_epoch * epochs
  optim = protocol_optim(block)
  optim.warmup_steps = warmup
  schedule = optim_lib.learning_rate_schedule(
      optim, optim_lib.peak_learning_rate(optim, batch), total)
  tx = optim_lib.build_optimizer(optim, schedule)
  if init is None:
    rng = np.random.default_rng(block.seed)
    init = {'kernel': rng.normal(size=(features.shape[1], num_classes)) * block.head_init_std,
            'bias': np.zeros(num_classes)}
  params = {name: jnp.asarray(value, jnp.float32) for name, value in init.items()}
  params = _fit_head(params, tx, jnp.asarray(features, jnp.float32), jnp.asarray(labels),
                     jax.random.key(block.seed), num_classes, epochs=epochs, batch=batch)
  return params, batch, total


def _fit_head(params: dict, tx: optax.GradientTransformation, features: jax.Array,
              labels: jax.Array, key: jax.Array, num_classes: int, *, epochs: int,
              batch: int) -> dict:
  """Mini-batch cross-entropy training of the head: `epochs` passes in a fresh order each.

  The reference reshuffles every epoch (DistributedSampler / RandomSampler);
  the orders are drawn on device, one epoch at a time.
  """
  steps_per_epoch = features.shape[0] // batch

  def loss(params, rows):
    logits = features[rows] @ params['kernel'] + params['bias']  # (B, classes)
    return optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels[rows], num_classes)).mean()

  def step(carry, rows):
    params, opt_state = carry
    updates, opt_state = tx.update(jax.grad(loss)(params, rows), opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  def epoch(carry, epoch_key):
    order = jax.random.permutation(epoch_key, features.shape[0])
    order = order[:steps_per_epoch * batch].reshape(steps_per_epoch, batch)
    return jax.lax.scan(step, carry, order)[0], None

  @jax.jit
  def fit(params, keys):
    return jax.lax.scan(epoch, (params, tx.init(params)), keys)[0][0]

  return fit(params, jax.random.split(key, epochs))
