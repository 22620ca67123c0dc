"""The config blocks every method's config shares: `train`, `eval`, `optim`, `mesh`.

This module imports only ml_collections, so loading a config file imports
no jax (and no trainer, Orbax, grain or evaluator): `--help` and a config
typo cost no accelerator start-up. The modules that use a block (train.py,
eval/, optim.py, sharding.py) read it; none of them defines one.
"""

from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

# torchvision's ImageNet statistics, used by the MAE, SimCLR and DINO code.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _block(defaults: dict[str, Any], overrides: dict[str, Any],
           name: str) -> ml_collections.ConfigDict:
  """`defaults` updated with `overrides`; a key not in `defaults` is an error naming it.

  A dict default is a sub-block: its override is a dict, checked the same way.
  """
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ValueError(f'Unknown {name} keys {unknown}; known: {sorted(defaults)}')
  merged = dict(defaults)
  for key, value in overrides.items():
    if isinstance(defaults[key], dict):
      _block(defaults[key], dict(value), f'{name}.{key}')  # Checks the sub-block's keys.
      value = {**defaults[key], **value}
    merged[key] = value
  return ml_collections.ConfigDict(merged)


def train_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.train` block every method shares, with its defaults."""
  return _block(dict(
      steps=placeholder(int),            # If set, wins over epochs.
      epochs=placeholder(float),
      steps_per_epoch=placeholder(int),  # Filled in by the trainer from the data.
      log_every=100,
      checkpoint_every=2000,
      eval_every=5000,                   # The evaluations' default cadence (0: only at the end).
      keep_checkpoints=3,
      init_from=placeholder(str),        # A workdir or export/ whose weights start a fresh run.
      max_nonfinite_steps=10,            # Consecutive skipped (NaN/Inf) steps before the run stops.
      grad_accum_steps=1,                # Micro-batches per step (one update), same result.
      profile_steps=0,                   # >0: a profiler trace of that many steps, in profile/.
  ), overrides, 'config.train')


# Every evaluation of the registry (ssl_jax/eval/registry.py) has a block in
# every config, off by default, so that any of them can be switched on from
# the command line (`--config.eval.knn.enabled=True`) and a method that
# cannot do it is refused at setup, by name. `every`: steps between runs;
# None follows `train.eval_every`, 0 runs it only at the end. Every enabled
# evaluation also runs at the end of training. A function, not a constant: a
# placeholder is a reference, which configs must not share.
def evaluation_blocks() -> dict[str, dict[str, Any]]:
  """{evaluation name: its default block}, fresh on every call."""
  return {
      # Weighted kNN on frozen features, train_source votes for test_source (DINO's eval_knn).
      'knn': dict(enabled=False, every=placeholder(int), k=20, temperature=0.07),
      # Offline softmax classifier fitted to frozen, standardised train_source features.
      'linear_probe': dict(enabled=False, every=placeholder(int), steps=300, lr=0.01),
      # Top-1 on test_source of the probe a method trains alongside (SimCLR).
      'online_probe': dict(enabled=False, every=placeholder(int)),
      # The pretext task on held-out data (a language model's validation loss, accuracy).
      'held_out': dict(enabled=False, every=placeholder(int)),
      # The method's picture (reconstructions, views, attention maps) under images/.
      'pictures': dict(enabled=False, every=placeholder(int)),
  }


def eval_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.eval` block: shared eval data, then one sub-block per evaluation.

  The evaluations that read labels (kNN, linear probe, online probe) use
  the labelled splits `train_source` and `test_source`, read in batches of
  `batch_size`. `random_init_baseline` also scores a freshly initialised
  encoder at the end, next to the trained one. Sub-blocks take dicts:
  `eval_config(knn=dict(enabled=True))`.
  """
  return _block(dict(
      train_source='',
      test_source='',
      batch_size=1024,
      random_init_baseline=False,
      **evaluation_blocks(),
  ), overrides, 'config.eval')


def optim_config(**overrides) -> ml_collections.ConfigDict:
  """The `config.optim` block with its defaults (AdamW, warmup + cosine); see optim.py."""
  return _block(dict(
      name='adamw',
      lr=1e-3,
      lr_scaling='linear',
      schedule='warmup_cosine',
      warmup_steps=placeholder(int),
      warmup_epochs=placeholder(float),
      min_lr=0.0,
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      momentum=0.9,
      trust_coefficient=0.001,           # LARS eta.
      grad_clip_norm=0.0,
      grad_clip_scope='global',          # Or 'per_parameter' (DINO).
      weight_decay_end=placeholder(float),  # None: constant.
      weight_decay_steps=placeholder(int),
      freeze_module='last_layer',
      freeze_steps=0,
      layer_decay=placeholder(float),    # None: off; MAE fine-tuning 0.65 (ViT-B), 0.75 (ViT-L).
  ), overrides, 'config.optim')


MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Logical name -> mesh axis (see sharding.py). Every logical name a model uses
# must appear: flax passes unknown names through unchanged, which then fail as
# mesh axes.
DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv', None),
    ('vocab', 'tensor'),
    ('conv_in', None),
    ('conv_out', 'tensor'),
)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """The `config.mesh` block: axis sizes (-1 = all remaining devices) and rules."""
  return ml_collections.ConfigDict(
      {'data': data, 'fsdp': fsdp, 'tensor': tensor, 'rules': DEFAULT_RULES})
