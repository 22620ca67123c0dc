"""The `config.train` and `config.eval` blocks every method's config shares.

Kept apart from train.py so that loading a config file imports only
ml_collections, not the trainer (Orbax, grain, the evaluator).
"""

from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder


def _block(defaults: dict[str, Any], overrides: dict[str, Any],
           name: str) -> ml_collections.ConfigDict:
  """`defaults` updated with `overrides`; a key not in `defaults` is an error naming it."""
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ValueError(f'Unknown {name} keys {unknown}; known: {sorted(defaults)}')
  block = ml_collections.ConfigDict(defaults)
  block.update(overrides)
  return block


def train_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.train` block every method shares, with its defaults."""
  return _block(dict(
      steps=placeholder(int),            # If set, wins over epochs.
      epochs=placeholder(float),
      steps_per_epoch=placeholder(int),  # Filled in by the trainer from the data.
      log_every=100,
      checkpoint_every=2000,
      eval_every=5000,                   # Evals every N steps (0: only at the end).
      keep_checkpoints=3,
      init_from=placeholder(str),        # A workdir or export/ whose weights start a fresh run.
  ), overrides, 'config.train')


def eval_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.eval` block every method shares, with its defaults.

  The kNN and linear probes (on frozen features, in host memory) need both
  labelled splits, `train_source` and `test_source`; the held-out loss of
  the language methods needs none of them.
  """
  return _block(dict(
      knn=False,
      train_source='',
      test_source='',
      knn_k=20,
      knn_temperature=0.07,
      linear_probe=False,                # Offline softmax probe on frozen features.
      linear_probe_steps=300,
      linear_probe_lr=0.01,
      batch_size=1024,
      random_init_baseline=False,        # Also score a randomly initialised encoder, at the end.
      pictures=True,                     # The method's pictures under images/ at each eval.
  ), overrides, 'config.eval')
