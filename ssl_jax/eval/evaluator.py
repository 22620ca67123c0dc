"""Runs the configured evaluations on a train state, each at its cadence, and at the end.

The trainer asks `due(step)` after each step and calls the evaluator when
it is; at the end of training it calls `final`, which also scores a freshly
initialised encoder when `config.eval.random_init_baseline` is set, and
`summary` returns the evaluations' own end-of-run lines.
"""

from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from ssl_jax.eval import registry
from ssl_jax.eval.base import Context, Round
from ssl_jax.eval.passes import LabelledData
from ssl_jax.methods.base import Method
from ssl_jax.metrics import MetricWriter


class Evaluator:
  """The run's evaluations (see `registry`), built once."""

  def __init__(self, config: ml_collections.ConfigDict, method: Method,
               graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, writer: MetricWriter,
               workdir: epath.Path):
    self.context = Context(config=config, method=method, graphdef=graphdef, mesh=mesh,
                           workdir=workdir, writer=writer, labelled=LabelledData(config))
    self.evaluations = registry.create(self.context)

  def model(self, state: dict[str, Any]) -> nnx.Module:
    """The whole model, sharing the train state's arrays."""
    return nnx.merge(self.context.graphdef, state['params'], state['model_state'])

  def encoder(self, state: dict[str, Any]) -> nnx.Module:
    """The method's encoder, sharing the train state's arrays."""
    return self.context.method.encoder(self.model(state))

  def every(self, evaluation) -> int:
    """Steps between runs of `evaluation` (0: only at the end)."""
    every = evaluation.block.every
    return self.context.config.train.eval_every if every is None else every

  def _due(self, evaluation, step: int) -> bool:
    every = self.every(evaluation)
    return bool(every) and step % every == 0

  def due(self, step: int) -> bool:
    """Whether any evaluation runs after `step` (before the last step)."""
    return step < self.context.config.train.steps and any(
        self._due(e, step) for e in self.evaluations)

  def __call__(self, state: dict[str, Any], batch: Any, rng: jax.Array, *,
               final: bool = False) -> dict[str, float]:
    """The metrics of every evaluation due at the state's step (all of them if `final`)."""
    step = int(state['step'])
    round_ = Round(state=state, batch=batch, rng=rng, step=step, encoder=self.encoder(state))
    results = {}
    for evaluation in self.evaluations:
      if final or self._due(evaluation, step):
        results.update(evaluation.run(round_))
    return results

  def final(self, state: dict[str, Any], batch: Any, rng: jax.Array) -> dict[str, float]:
    """Every evaluation, and the random-init baseline when the config asks for it."""
    results = self(state, batch, rng, final=True)
    if self.context.config.eval.random_init_baseline:
      results.update(self.random_init_scores(state, batch, rng))
    return results

  def random_init_scores(self, state: dict[str, Any], batch: Any,
                         rng: jax.Array) -> dict[str, float]:
    """The encoder evaluations of a freshly initialised encoder of the same shape."""
    config = self.context.config
    encoder = self.context.method.build_encoder(nnx.Rngs(config.seed))
    round_ = Round(state=state, batch=batch, rng=rng, step=int(state['step']), encoder=encoder)
    scores = {}
    for evaluation in self.evaluations:
      scores.update(evaluation.score_encoder(round_))
    return {f'{name}_random_init': value for name, value in scores.items()
            if not name.endswith('_seconds')}

  def summary(self, results: dict[str, float]) -> list[str]:
    """The evaluations' end-of-run lines."""
    return [line for evaluation in self.evaluations for line in evaluation.summary(results)]
