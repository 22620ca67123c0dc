"""What every evaluation is given and offers: `Context`, `Round` and `Evaluation`.

An evaluation (one class per kind, registered in `registry.py`) is built
once per run from its config block (`config.eval.<name>`) and the run's
`Context`. The evaluator calls `run` at its cadence and at the end, with a
`Round` that evaluations of the same step share (e.g. the kNN and the
linear probe read the same frozen features). Each evaluation names the
method capability it needs (`requires`, see `ssl_jax.methods.base`) and
writes its own end-of-run lines (`summary`): the trainer formats no metric.
"""

import abc
import dataclasses
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from ssl_jax.eval.passes import LabelledData
from ssl_jax.methods.base import Method
from ssl_jax.metrics import MetricWriter


@dataclasses.dataclass
class Context:
  """The run an evaluation belongs to."""
  config: ml_collections.ConfigDict
  method: Method
  graphdef: nnx.GraphDef
  mesh: jax.sharding.Mesh
  workdir: epath.Path
  writer: MetricWriter
  labelled: LabelledData  # Labelled eval batches by source spec (cached when small).


@dataclasses.dataclass
class Round:
  """One step's evaluations: the train state, a train batch and what they share."""
  state: dict[str, Any]
  batch: Any
  rng: jax.Array
  step: int
  encoder: nnx.Module  # The method's encoder, sharing the state's arrays.
  cache: dict[str, Any] = dataclasses.field(default_factory=dict)


class Evaluation(abc.ABC):
  """One configured evaluation."""

  requires = ''  # The method capability this evaluation needs.
  uses_labels = False  # Needs config.eval.train_source / test_source.

  def __init__(self, name: str, block: ml_collections.ConfigDict, context: Context):
    self.name, self.block, self.context = name, block, context

  @abc.abstractmethod
  def run(self, round_: Round) -> dict[str, float]:
    """The evaluation's metrics for the round's train state."""

  def score_encoder(self, round_: Round) -> dict[str, float]:
    """Metrics of `round_.encoder` alone (the random-init baseline); {} if not applicable."""
    del round_
    return {}

  def summary(self, results: dict[str, float]) -> list[str]:
    """Lines for the end of the run, from the final results (all evaluations')."""
    del results
    return []
