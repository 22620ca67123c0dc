r"""Protocols of `python -m ssl_jax.probe`: evaluate an exported encoder.

Variants (`--config=configs/probe.py:VARIANT`; the default is `mae`):
  knn     the weighted kNN alone (dino eval_knn.py): the quick check.
  mae     kNN + MAE's linear probe (mae main_linprobe.py, the paper's appendix on linear probing).
  simclr  kNN + SimCLR's linear eval (google-research/simclr README.md lines 116-121, run.py).
  dino    kNN + DINO's linear probe (dino eval_linear.py).
  lm      GPT / BERT exports: next-token or masked-token loss on the held-out text.
  finetune[_RECIPE]
          kNN + fine-tuning: a training run on the trainer (configs/finetune.py:RECIPE, held
          whole in `config.finetune`, so `--config.finetune.optim.lr=...` overrides it) in
          DIR/finetune, resumed by rerunning the command. RECIPE: none (MAE's ViT-B), vit_l,
          resnet (SimCLR's), local or resnet_local (the digits exports of the :local configs).

  python -m ssl_jax.probe --workdir=/tmp/mae [--config=configs/probe.py:dino] \
      [--config.eval.test_source=digits:test --config.eval.linear_probe.epochs=50 ...]

Each protocol keeps its reference's number of optimizer steps (`min_steps`:
on ImageNet the epochs give it; on a small split, such as the 1,437 digits,
the epochs rise until the head takes as many steps as the reference's, at
the batch-scaled lr of the batch actually used). Unset data / eval sources
(None) come from the export's own config. The
linear probe trains on features computed once, without augmentation
(`ssl_jax.eval.linear_probe.protocol_linear_probe`): the references augment
every epoch and run the frozen encoder each step (README, deviations). A
batch larger than the labelled train split is capped at it, and the lr is
scaled by the batch actually used. GPT and BERT exports always get the
language-model probe; `knn` and `linear_probe` apply to image encoders.
"""

import importlib.util
import pathlib

import ml_collections
from ml_collections.config_dict import placeholder


def finetune_config(recipe: str | None) -> ml_collections.ConfigDict:
  """configs/finetune.py's config for `recipe`, loaded from beside this file."""
  path = pathlib.Path(__file__).with_name('finetune.py')
  spec = importlib.util.spec_from_file_location('_ssl_jax_finetune_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(recipe)


def _linear(**protocol) -> dict:
  """A linear-probe block: the protocol's values over neutral defaults."""
  block = dict(
      enabled=True,
      n_last_blocks=0,             # 0: the method's own feature; n: DINO's last-n [CLS] (ViT).
      avgpool_patchtokens=False,
      feature_norm='none',         # 'batchnorm': BatchNorm without affine before the head.
      bn_eps=1e-6,
      optimizer='sgd',             # lars | sgd (ssl_jax.optim), with momentum.
      momentum=0.9,
      trust_coefficient=0.001,
      weight_decay=0.0,
      batch_size=256,
      epochs=100,
      min_steps=0,                 # More epochs until the head takes this many steps (below).
      lr=0.1,                      # Base lr; peak = lr * batch / 256 when lr_scaling='linear'.
      lr_scaling='linear',
      warmup_epochs=0.0,           # Then a cosine to 0.
      head_init_std=0.01,          # 0: zero init.
      seed=0,
  )
  block.update(protocol)
  return block


PROTOCOLS = {
    'mae': _linear(
        feature_norm='batchnorm',  # main_linprobe.py L222: BatchNorm1d(affine=False, eps=1e-6).
        bn_eps=1e-6,               # main_linprobe.py L222.
        optimizer='lars',          # main_linprobe.py L252: LARS(head params, weight_decay=0).
        momentum=0.9,              # util/lars.py L18.
        trust_coefficient=0.001,   # util/lars.py L18.
        weight_decay=0.0,          # main_linprobe.py L55.
        batch_size=16384,          # PRETRAIN.md L174: 512 x 4 nodes x 8 GPUs; paper Table 9.
        epochs=90,                 # main_linprobe.py L46.
        # 90 x 78: 1,281,167 images over 32 GPUs, 512 each, drop_last (main_linprobe.py L178).
        min_steps=7020,
        lr=0.1,                    # main_linprobe.py L60: blr, lr = blr * batch / 256 (L240).
        lr_scaling='linear',       # main_linprobe.py L240.
        warmup_epochs=10.0,        # main_linprobe.py L66; util/lr_sched.py: then half cosine.
        head_init_std=0.01,        # main_linprobe.py L218: trunc_normal_(std=0.01).
    ),
    'simclr': _linear(
        feature_norm='none',       # tf2/model.py L124: LinearLayer(use_bn=False) for the head.
        optimizer='sgd',           # README.md L119: --optimizer=momentum.
        momentum=0.9,              # tf2/run.py L168.
        weight_decay=0.0,          # README.md L119: --weight_decay=0.0.
        batch_size=512,            # README.md L120: --train_batch_size=512 (CIFAR-10).
        epochs=100,                # README.md L120: --train_epochs=100.
        min_steps=9766,            # tf2/model.py L74-75: 50,000 x 100 // 512 + 1 (CIFAR-10).
        lr=0.1,                    # README.md L119: --learning_rate=0.1.
        lr_scaling='linear',       # tf2/run.py L42: learning_rate_scaling default 'linear'.
        warmup_epochs=0.0,         # README.md L120: --warmup_epochs=0; then cosine (model.py).
        head_init_std=0.0,         # README.md L117: --zero_init_logits_layer=True.
    ),
    'dino': _linear(
        n_last_blocks=4,           # eval_linear.py L256: 4 for ViT-S (1 + avgpool for ViT-B).
        avgpool_patchtokens=False,  # eval_linear.py L258.
        feature_norm='none',       # eval_linear.py L41: a plain nn.Linear on the features.
        optimizer='sgd',           # eval_linear.py L104: torch.optim.SGD.
        momentum=0.9,              # eval_linear.py L106.
        weight_decay=0.0,          # eval_linear.py L107.
        batch_size=1024,           # eval_linear.py L270: 128 per GPU x 8 GPUs.
        epochs=100,                # eval_linear.py L265.
        min_steps=125200,          # 100 x 1,252: 1,281,167 images over 8 GPUs, 128 each (L93).
        lr=0.001,                  # eval_linear.py L266, scaled by batch / 256 (L105).
        lr_scaling='linear',       # eval_linear.py L105.
        warmup_epochs=0.0,         # eval_linear.py L109: CosineAnnealingLR(epochs, eta_min=0).
        head_init_std=0.01,        # eval_linear.py L243: normal_(std=0.01), bias 0.
    ),
}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The probe config; `variant` is the text after ':' in --config."""
  variant = variant or 'mae'
  protocol, _, recipe = variant.partition('_')
  if variant not in (*PROTOCOLS, 'knn', 'lm') and protocol != 'finetune':
    raise ValueError(f'Unknown variant {variant!r} of probe.py: use knn, mae, simclr, dino, lm, '
                     'finetune or finetune_RECIPE (a configs/finetune.py variant).')
  config = ml_collections.ConfigDict()
  config.protocol = protocol if protocol == 'finetune' else variant
  if protocol == 'finetune':
    config.finetune_recipe = recipe
    config.finetune = finetune_config(recipe or None)
  # Overrides of the export's config.data (None: the run's own).
  config.data = ml_collections.ConfigDict(dict(
      source=placeholder(str),       # Images: derives eval sources; text: the text to score.
      val_fraction=placeholder(float),  # Text: the held-out share of `source` that is scored.
  ))
  config.eval = ml_collections.ConfigDict(dict(
      train_source=placeholder(str),  # Labelled splits (None: the run's, or from data.source).
      test_source=placeholder(str),
      batch_size=256,                # Examples per forward pass of the frozen encoder.
      # dino eval_knn.py L194: nb_knn in (10, 20, 100, 200), 20 in the paper; L196: T 0.07.
      knn=dict(enabled=variant != 'lm', k=20, temperature=0.07),
      linear_probe=_linear(**PROTOCOLS.get(variant, {}),
                           **({} if variant in PROTOCOLS else {'enabled': False})),
  ))
  return config
