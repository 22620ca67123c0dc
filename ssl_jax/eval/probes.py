"""Evaluations that read labels: the kNN probe, the offline linear probe, the online probe.

- `knn` (config.eval.knn): the encoder's features of `eval.train_source`
  vote for those of `eval.test_source` (`knn.py`, DINO's eval_knn).
- `linear_probe` (config.eval.linear_probe): a softmax classifier fitted to
  the frozen train-split features, scored on the test split (`linear_probe.py`).
- `online_probe` (config.eval.online_probe): top-1 on `eval.test_source` of
  the probe the method trains alongside pretraining (SimCLR's).

kNN and linear probe of one round share the features, extracted once.
"""

import time

import jax
from flax import nnx

from ssl_jax.eval import knn, linear_probe
from ssl_jax.eval.base import Evaluation, Round
from ssl_jax.eval.passes import extract_features, valid_rows


class _FrozenFeatureProbe(Evaluation):
  """A probe on frozen features of the labelled train and test splits."""

  requires = 'features'
  uses_labels = True
  metric = ''  # The top-1 key it logs.
  title = ''  # For the end-of-run line.

  def split_features(self, round_: Round):
    """((train features, labels), (test features, labels)) of the round's encoder, memoised."""
    if 'split_features' not in round_.cache:
      ctx, cfg = self.context, self.context.config.eval
      round_.cache['split_features'] = tuple(
          extract_features(ctx.method, round_.encoder, ctx.labelled(spec), ctx.mesh)
          for spec in (cfg.train_source, cfg.test_source))
    return round_.cache['split_features']

  def run(self, round_: Round) -> dict[str, float]:
    return self.score_encoder(round_)

  def summary(self, results: dict[str, float]) -> list[str]:
    key = self.metric
    if key not in results:
      return []
    cfg, baseline = self.context.config.eval, results.get(f'{key}_random_init')
    return [f'{self.title}, {cfg.train_source} -> {cfg.test_source}: trained {results[key]:.4f}'
            + ('' if baseline is None else f' | random init {baseline:.4f}')]


class KNN(_FrozenFeatureProbe):
  """Weighted kNN top-1 (`knn_top1`) and its time (`knn_seconds`)."""

  metric = 'knn_top1'

  @property
  def title(self) -> str:
    return f'kNN top-1 (k={self.block.k})'

  def score_encoder(self, round_: Round) -> dict[str, float]:
    start = time.perf_counter()
    (train, train_labels), (test, test_labels) = self.split_features(round_)
    top1 = knn.knn_accuracy(train, train_labels, test, test_labels, k=self.block.k,
                            temperature=self.block.temperature)
    return {'knn_top1': top1, 'knn_seconds': time.perf_counter() - start}


class LinearProbe(_FrozenFeatureProbe):
  """Offline linear-probe top-1 (`linear_top1`) and its time (`linear_seconds`)."""

  metric = 'linear_top1'
  title = 'linear probe top-1'

  def score_encoder(self, round_: Round) -> dict[str, float]:
    start = time.perf_counter()
    train, test = self.split_features(round_)
    top1 = linear_probe.linear_probe_accuracy(*train, *test, steps=self.block.steps,
                                              lr=self.block.lr)
    return {'linear_top1': top1, 'linear_seconds': time.perf_counter() - start}


class OnlineProbe(Evaluation):
  """Top-1 of the method's own online probe (`probe_top1`) on the test split."""

  requires = 'online_probe'
  uses_labels = True

  def __init__(self, *args):
    super().__init__(*args)
    method, graphdef = self.context.method, self.context.graphdef
    self._classify = jax.jit(lambda params, rest, images: method.classify(
        nnx.merge(graphdef, params, rest), images).argmax(-1))

  def run(self, round_: Round) -> dict[str, float]:
    ctx, state = self.context, round_.state
    rows = valid_rows(
        lambda b: {'predicted': self._classify(state['params'], state['model_state'],
                                               b['image'])},
        ctx.labelled(ctx.config.eval.test_source), ctx.mesh)
    correct = rows['predicted'] == rows['label']
    return {'probe_top1': float(correct.mean()) if len(correct) else 0.0}

  def summary(self, results: dict[str, float]) -> list[str]:
    if 'probe_top1' not in results:
      return []
    return [f'{self.context.method.classifier_title} on {self.context.config.eval.test_source}: '
            f'{results["probe_top1"]:.4f}']
