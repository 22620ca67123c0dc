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
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ssl_jax import sharding
from ssl_jax.errors import DivergedError
from ssl_jax.methods.base import Method
from ssl_jax.metrics import log_line

TrainState = dict[str, Any]


def all_finite(tree: Any) -> jax.Array:
  """True when every floating-point leaf of `tree` is finite (PRNG keys and ints are skipped)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(method: Method, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, shardings: Any, mesh: jax.sharding.Mesh):
  """Returns jit(step)(state, batch, rng) -> (state, metrics), donating `state`.

  `metrics['nonfinite_steps']` is 1 when the step was skipped (see the module docstring).
  """
  def loss_and_grads(params, model_state, batch, rng, step):
    def loss_of(params):
      # copy=True: BatchNorm-style updates inside grad must not touch outer-trace variables.
      model = nnx.merge(graphdef, params, model_state, copy=True)
      loss, metrics = method.loss_fn(model, batch, rng, step)
      return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    return loss, metrics, model_state, grads

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
                 out_shardings=(shardings, sharding.replicated(mesh)))


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
