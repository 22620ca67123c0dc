"""The evals the trainer runs every `train.eval_every` steps and at the end.

- kNN probe (`eval.knn`): the encoder's features of `eval.train_source` vote
  for those of `eval.test_source`.
- Offline linear probe (`eval.linear_probe`): a softmax classifier fitted to
  the frozen train-split features, scored on the test split.
- Online linear probe (methods with `classify`, e.g. SimCLR): top-1 of the
  probe trained alongside pretraining, on `eval.test_source`.
- Held-out pretext metrics (methods with `eval_step`, e.g. a language
  model's validation loss): summed over `method.eval_batches`, logged as
  `val_<name>`.
- Pictures (`eval.pictures`): what the method draws (`visualize` + `render`),
  saved under `workdir/images/` and in TensorBoard.
"""

import time
from collections.abc import Iterable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from ssl_jax import sharding
from ssl_jax.data import pipeline
from ssl_jax.eval import knn, pictures
from ssl_jax.eval.features import extract_features
from ssl_jax.eval.linear_probe import linear_probe_accuracy
from ssl_jax.methods.base import Method
from ssl_jax.metrics import MetricWriter

# Eval batches of sources smaller than this are kept in host memory between evals.
_CACHE_BYTES = 512 * 2**20


class EvalData:
  """Labelled eval batches by source spec, cached in memory when small."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self._cache: dict[str, list[dict]] = {}

  def __call__(self, spec: str) -> Iterable[dict]:
    """A fresh pass over `spec`'s eval batches (this process's share)."""
    if spec in self._cache:
      return self._cache[spec]
    batches = pipeline.eval_batches(
        self.config.data, spec, batch_size=self.config.eval.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    data = self.config.data
    if batches.num_examples * data.image_size ** 2 * data.channels < _CACHE_BYTES:
      self._cache[spec] = list(batches)
      return self._cache[spec]
    return batches


class Evaluator:
  """Runs the configured evals on a train state."""

  def __init__(self, config: ml_collections.ConfigDict, method: Method,
               graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh, writer: MetricWriter,
               workdir: epath.Path):
    self.config, self.method, self.graphdef, self.mesh = config, method, graphdef, mesh
    self.writer, self.workdir = writer, workdir
    self.data = EvalData(config)
    has_splits = bool(config.eval.train_source and config.eval.test_source)
    self.knn = bool(config.eval.knn and has_splits)
    self.linear = bool(config.eval.linear_probe and has_splits)
    self.probe = bool(type(method).classify is not Method.classify and config.eval.test_source)
    self.held_out = type(method).eval_step is not Method.eval_step
    self._eval_step = jax.jit(lambda params, rest, batch: method.eval_step(
        nnx.merge(graphdef, params, rest), batch))
    self._visualize = jax.jit(lambda params, rest, batch, rng: method.visualize(
        nnx.merge(graphdef, params, rest), batch, rng))
    self._classify = jax.jit(lambda params, rest, images: method.classify(
        nnx.merge(graphdef, params, rest), images))

  def model(self, state: dict[str, Any]) -> nnx.Module:
    """The whole model, sharing the train state's arrays."""
    return nnx.merge(self.graphdef, state['params'], state['model_state'])

  def encoder(self, state: dict[str, Any]) -> nnx.Module:
    """The method's encoder, sharing the train state's arrays."""
    return self.method.encoder(self.model(state))

  def representation_scores(self, encoder: nnx.Module) -> dict[str, float]:
    """kNN and offline linear-probe top-1 of a frozen encoder (train -> test split)."""
    cfg, scores = self.config.eval, {}
    if not (self.knn or self.linear):
      return scores
    start = time.perf_counter()
    train = extract_features(self.method, encoder, self.data(cfg.train_source), self.mesh)
    test = extract_features(self.method, encoder, self.data(cfg.test_source), self.mesh)
    if self.knn:
      scores['knn_top1'] = knn.knn_accuracy(*train, *test, k=cfg.knn_k,
                                            temperature=cfg.knn_temperature)
    if self.linear:
      scores['linear_top1'] = linear_probe_accuracy(
          *train, *test, steps=cfg.linear_probe_steps, lr=cfg.linear_probe_lr)
    scores['probe_seconds'] = time.perf_counter() - start
    return scores

  def probe_top1(self, state: dict[str, Any]) -> float:
    """Top-1 accuracy of the online probe on eval.test_source."""
    correct = total = 0
    for batch in self.data(self.config.eval.test_source):
      placed = sharding.put_batch(batch, self.mesh)
      logits = self._classify(state['params'], state['model_state'], placed['image'])
      predicted, label, valid = (np.asarray(x) for x in multihost_utils.process_allgather(
          (logits.argmax(-1), placed['label'], placed['valid']), tiled=True))
      correct += int(((predicted == label) & valid).sum())
      total += int(valid.sum())
    return correct / max(total, 1)

  def held_out_scores(self, state: dict[str, Any]) -> dict[str, float]:
    """`val_<name>`: the method's eval_step sums over its held-out batches."""
    totals: dict[str, list[float]] = {}
    for batch in self.method.eval_batches(self.workdir) or ():
      placed = sharding.put_batch(batch, self.mesh)
      sums = jax.device_get(self._eval_step(state['params'], state['model_state'], placed))
      for name, (total, count) in sums.items():
        running = totals.setdefault(name, [0.0, 0.0])
        running[0] += float(total)
        running[1] += float(count)
    return {f'val_{name}': total / max(count, 1e-9) for name, (total, count) in totals.items()}

  def __call__(self, state: dict[str, Any], batch: dict, rng: jax.Array) -> dict[str, float]:
    """Eval metrics for `state`; saves a picture under images/ when the method draws one."""
    step = int(state['step'])
    results = self.representation_scores(self.encoder(state))
    if self.probe:
      results['probe_top1'] = self.probe_top1(state)
    if self.held_out:
      results.update(self.held_out_scores(state))
    if self.config.eval.pictures:
      arrays = self._visualize(state['params'], state['model_state'], batch, rng)
      if arrays is not None:
        picture = self.method.render(multihost_utils.process_allgather(arrays, tiled=True))
        if jax.process_index() == 0:
          pictures.save_png(picture, self.workdir / 'images' / f'step_{step:07d}.png')
        self.writer.write_image(step, self.method.picture_name, picture)
    return results

  def random_init_scores(self) -> dict[str, float]:
    """The same probes on a freshly initialised encoder of the same shape (a baseline)."""
    scores = self.representation_scores(self.method.build_encoder(nnx.Rngs(self.config.seed)))
    scores.pop('probe_seconds', None)
    return {f'{name}_random_init': value for name, value in scores.items()}
