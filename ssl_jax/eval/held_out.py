"""`held_out` (config.eval.held_out): the pretext task on held-out data.

The method's `eval_step` returns {name: (sum, count)} for one global batch
of `ssl_jax.data.streams.held_out_batches` (a language model's every
validation window, once); this evaluation sums both over the split and logs
`val_<name>` = sum / count (e.g. `val_loss`, `val_masked_accuracy`).
"""

import jax
from flax import nnx

from ssl_jax.data import streams
from ssl_jax.eval.base import Evaluation, Round
from ssl_jax.eval.passes import device_pass


class HeldOut(Evaluation):
  """Held-out pretext metrics, `val_<name>`."""

  requires = 'held_out'

  def __init__(self, *args):
    super().__init__(*args)
    method, graphdef = self.context.method, self.context.graphdef
    self._eval_step = jax.jit(lambda params, rest, batch: method.eval_step(
        nnx.merge(graphdef, params, rest), batch))
    self._spec = type(method).data_spec(self.context.config)

  def run(self, round_: Round) -> dict[str, float]:
    ctx, state = self.context, round_.state
    batches = streams.held_out_batches(ctx.config, self._spec, ctx.workdir) or ()
    totals: dict[str, list[float]] = {}
    for sums in device_pass(
        lambda b: self._eval_step(state['params'], state['model_state'], b), batches, ctx.mesh):
      for name, (total, count) in jax.device_get(sums).items():
        running = totals.setdefault(name, [0.0, 0.0])
        running[0] += float(total)
        running[1] += float(count)
    return {f'val_{name}': total / max(count, 1e-9) for name, (total, count) in totals.items()}

  def summary(self, results: dict[str, float]) -> list[str]:
    held_out = {k[4:]: v for k, v in results.items() if k.startswith('val_')}
    if not held_out:
      return []
    return [f'held-out split at step {self.context.config.train.steps}: '
            + ', '.join(f'{k} {v:.4f}' for k, v in held_out.items())]
