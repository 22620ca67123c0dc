"""The train step: a pure function of (state, batch, rng), jitted once, and its guard.

`make_train_step` builds the step `ssl_jax.train` runs. A step whose loss,
gradients or new variables are not all finite is not applied: its result
is the state it was given, with only `step` advanced (the batch it drew
is consumed, the learning-rate schedule moves on and the next step's rng
differs, so an unlucky batch or mask is not met again). The step reports
it as `nonfinite_steps` = 1 in its metrics; `NonFiniteGuard` reads that on
the host, logs each skipped step and stops the run after
`train.max_nonfinite_steps` consecutive ones. So no state holding a NaN or
an Inf ever reaches a checkpoint.

This is a hand-written select rather than `optax.apply_if_finite`: that
wrapper only looks at the updates, keeps its own counters in `opt_state`
(old checkpoints would no longer restore), leaves BatchNorm statistics, EMA
teachers and centers (`model_state`) to be poisoned, and after its limit it
applies the non-finite update instead of stopping
(optax/_src/transform.py, `apply_if_finite`).

With `train.grad_accum_steps` k > 1 the step cuts its batch into k
micro-batches and sums their gradients in a `lax.scan` before one update
(`accumulated`): the same loss and parameters as the whole batch, for the
methods whose loss is a mean over examples or tokens (MAE, GPT, BERT,
fine-tuning). SimCLR and DINO couple the examples of a batch (NT-Xent
negatives, BatchNorm, DINO's center): `check_grad_accum` refuses them.
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ssl_jax import sharding, xla_options
from ssl_jax.errors import ConfigError, DivergedError
from ssl_jax.methods.base import Method
from ssl_jax.metrics import log_line

TrainState = dict[str, Any]


def all_finite(tree: Any) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (PRNG keys and ints are skipped)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(method: Method, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, shardings: Any, mesh: jax.sharding.Mesh,
                    *, grad_accum_steps: int = 1):
  """Returns jit(step)(state, batch, rng) -> (state, metrics), donating `state`.

  With `grad_accum_steps` k > 1 the batch is cut into k micro-batches whose
  gradients are summed in a `lax.scan` before one optimizer update (see
  `accumulated`). `metrics['nonfinite_steps']` is 1 when the step was
  skipped (see the module docstring).
  """
  def loss_and_grads(params, model_state, batch, rng, step):
    def loss_of(params):
      # copy=True: BatchNorm-style updates inside grad must not touch outer-trace variables.
      model = nnx.merge(graphdef, params, model_state, copy=True)
      loss, metrics = method.loss_fn(model, batch, rng, step)
      return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return loss, metrics, model_state, grads

  if grad_accum_steps > 1:
    loss_and_grads = functools.partial(accumulated, loss_and_grads, method, mesh,
                                       shardings['params'], grad_accum_steps)

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    step = state['step']
    rng = jax.random.fold_in(rng, step)
    loss, metrics, model_state, grads = loss_and_grads(
        state['params'], state['model_state'], batch, rng, step)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    model = nnx.merge(graphdef, params, model_state, copy=True)
    method.after_step(model, step)
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    finite = (jnp.isfinite(loss) & all_finite(grads) & all_finite(params)
              & all_finite(model_state))
    # A skipped step keeps every variable and the optimizer state as they were.
    kept = {'params': params, 'model_state': model_state, 'opt_state': opt_state}
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), kept,
                        {key: state[key] for key in kept})
    # A method may report its pretext loss as 'loss' when it optimises more (a probe).
    metrics = {'loss': loss, **metrics, 'lr': schedule(step),
               'grad_norm': optax.tree.norm(grads), 'param_norm': optax.tree.norm(kept['params']),
               'nonfinite_steps': jnp.logical_not(finite).astype(jnp.int32)}
    return {'step': step + 1, **kept}, metrics

  return jax.jit(train_step, donate_argnums=0,
                 out_shardings=(shardings, sharding.replicated(mesh)),
                 compiler_options=xla_options.step_options(mesh.devices.flat[0].platform))


# ------------------------------------------------------------------------------
# Gradient accumulation: k micro-batches, one update.
# ------------------------------------------------------------------------------
def check_grad_accum(config: ml_collections.ConfigDict, method_class: type[Method],
                     mesh: jax.sharding.Mesh) -> None:
  """ConfigError unless `train.grad_accum_steps` fits the method, the batch and the mesh."""
  k, batch_size = config.train.grad_accum_steps, config.data.batch_size
  if not isinstance(k, int) or k < 1:
    raise ConfigError(f'config.train.grad_accum_steps={k!r}: expected an integer >= 1.')
  if k == 1:
    return
  if method_class.batch_coupling:
    raise ConfigError(
        f'config.train.grad_accum_steps={k}: {config.method} cannot accumulate gradients '
        f'exactly: {method_class.batch_coupling}. Use grad_accum_steps=1 (more devices, '
        'or --config.mesh.fsdp to save memory, or a smaller data.batch_size).')
  shards = int(np.prod([mesh.shape[axis] for axis in sharding.BATCH_AXES]))
  if batch_size % (k * shards):
    raise ConfigError(
        f'config.data.batch_size={batch_size} must be divisible by train.grad_accum_steps '
        f'({k}) x the batch-sharding devices (mesh data x fsdp = {shards}), so that every '
        'micro-batch splits evenly over them.')


def accumulated(loss_and_grads: Callable, method: Method, mesh: jax.sharding.Mesh,
                param_shardings: Any, k: int, params: Any, model_state: Any, batch: dict,
                rng: jax.Array, step: jax.Array):
  """`loss_and_grads` of the whole batch, computed over k micro-batches in a `lax.scan`.

  Micro-batch i holds rows i, i + k, i + 2k, ...: every device's rows of the
  batch hold the same share of each micro-batch, so none moves between
  devices. Each micro-batch draws its own rng (the step's, folded with i)
  and sees the model state the previous one left (BatchNorm statistics
  would be updated k times: methods with such batch coupling are refused,
  `check_grad_accum`). Loss, metrics and gradients are the means weighted
  by `method.loss_weight`, so they are the whole batch's mean whatever the
  micro-batches count (BERT's masked tokens, GPT's padding); only the
  random draws (masks, dropout) differ from one step on the whole batch.
  """
  micro_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      None, sharding.BATCH_AXES))

  def split(x):  # (B, ...) -> (k, B / k, ...)
    x = jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, micro_sharding)

  def micro_step(carry, inputs):
    model_state, grad_sum = carry
    index, micro_batch = inputs
    loss, metrics, model_state, grads = loss_and_grads(
        params, model_state, micro_batch, jax.random.fold_in(rng, index), step)
    weight = method.loss_weight(micro_batch)
    grad_sum = jax.tree.map(lambda total, g: total + weight * g, grad_sum, grads)
    # The running sum is sharded as its parameter is (XLA would otherwise pick a layout).
    grad_sum = jax.lax.with_sharding_constraint(grad_sum, param_shardings)
    return (model_state, grad_sum), (weight, loss, metrics)

  zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params),
                                           param_shardings)
  (model_state, grad_sum), (weights, losses, metrics) = jax.lax.scan(
      micro_step, (model_state, zeros), (jnp.arange(k), jax.tree.map(split, batch)))
  total = jnp.where(weights.sum() > 0, weights.sum(), 1.0)  # No target at all: loss 0.

  def mean(values):  # (k, ...) -> weighted mean over the micro-batches
    return jnp.tensordot(weights, values.astype(jnp.float32), axes=1) / total

  grads = jax.tree.map(lambda g: (g / total).astype(g.dtype), grad_sum)
  return mean(losses), jax.tree.map(mean, metrics), model_state, grads


# ------------------------------------------------------------------------------
# Host side: the logging window and the consecutive-skip limit.
# ------------------------------------------------------------------------------
def window_scalars(pending: list[dict]) -> dict[str, float]:
  """Means over a logging window of step metrics; `nonfinite_steps` is the window's count.

  The means are over the applied steps only, so one skipped step does not
  turn the window's loss into NaN; a window where every step was skipped
  shows the (non-finite) values as they were.
  """
  fetched = jax.device_get(pending)
  stacked = {key: np.stack([metrics[key] for metrics in fetched]) for key in fetched[0]}
  skipped = stacked.pop('nonfinite_steps').astype(bool)
  applied = ~skipped if (~skipped).any() else np.ones_like(skipped)
  scalars = {key: float(np.mean(values[applied])) for key, values in stacked.items()}
  return scalars | {'nonfinite_steps': int(skipped.sum())}


class NonFiniteGuard:
  """Logs each skipped step and raises DivergedError after `limit` consecutive ones.

  It reads each step's flag one step late (`watch` reads the previous
  step's), so the host never waits for the step it has just dispatched and
  keeps loading the next batch while the device computes. `flush` reads the
  last one: call it before saving a checkpoint and at the end. The count
  starts at 0 in every process run (a resumed run forgets earlier skips).
  """

  def __init__(self, limit: int):
    self.limit = limit
    self.consecutive = 0
    self._unread = None

  def watch(self, step: int, metrics: dict) -> None:
    """Takes step `step`'s metrics; checks the previous step's flag."""
    previous, self._unread = self._unread, (step, metrics['nonfinite_steps'])
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    """Checks the flag not read yet, if any."""
    if self._unread is not None:
      previous, self._unread = self._unread, None
      self._check(*previous)

  def _check(self, step: int, flag: jax.Array) -> None:
    if not int(flag):
      self.consecutive = 0
      return
    self.consecutive += 1
    log_line(f'step {step}: the loss or a gradient is not finite; step skipped (parameters, '
             f'optimizer and model state kept; {self.consecutive} in a row, the run stops at '
             f'{self.limit}: train.max_nonfinite_steps).')
    if self.consecutive >= self.limit:
      first = step - self.consecutive + 1
      raise DivergedError(
          f'{self.consecutive} consecutive steps ({first} to {step}) had a non-finite loss or '
          f'gradient (train.max_nonfinite_steps={self.limit}): the run diverged and was stopped. '
          f'None of them was applied, so the state is that of step {first - 1}, and no '
          'checkpoint was saved at the stop: the newest checkpoint is the last good one. '
          'Lower optim.lr, lengthen the warmup or set optim.grad_clip_norm, then rerun the '
          'same command to resume from the newest checkpoint.')
