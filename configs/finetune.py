r"""Fine-tuning an exported ViT as a classifier (MAE's main_finetune.py and FINETUNE.md).

Variants (`--config=configs/finetune.py:VARIANT`):
  (none)     MAE's ViT-B/16 recipe (FINETUNE.md L66-77): batch 1024, blr 5e-4, layer decay
             0.65, 100 epochs, drop path 0.1; ImageNet-1k.
  vit_l      ViT-L/16 (FINETUNE.md L85-93): blr 1e-3, layer decay 0.75, 50 epochs, drop path 0.2.
  local      the digits export of configs/mae_vit.py:local, 2-3 minutes on 2 CPU cores.

  python -m ssl_jax.main --config=configs/mae_vit.py:local --workdir=/tmp/mae
  python -m ssl_jax.main --config=configs/finetune.py:local --workdir=/tmp/ft \
      --config.train.init_from=/tmp/mae/export

The encoder's shape comes from the export's config.json (`train.init_from`, or
`model.encoder_from`: fine-tune that shape from random weights, the baseline).
RandAugment and random erasing of the reference are not implemented (README, deviations).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from ssl_jax.config_blocks import (
  IMAGENET_MEAN,
  IMAGENET_STD,
  eval_config,
  mesh_config,
  optim_config,
  train_config,
)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The fine-tuning config; `variant` is the text after ':' in --config."""
  config = ml_collections.ConfigDict()
  config.method = 'finetune'
  config.seed = 0

  config.data = ml_collections.ConfigDict(dict(
      source='tfds:imagenet2012:train',
      tfds_dir=placeholder(str),
      batch_size=1024,             # FINETUNE.md L77: 32 per GPU x 32 GPUs.
      image_size=224,
      channels=3,
      crop_scale=(0.08, 1.0),      # util/datasets.py build_transform: timm create_transform.
      crop_ratio=(3 / 4, 4 / 3),
      hflip=True,
      interpolation='bicubic',     # util/datasets.py: interpolation='bicubic'.
      eval_crop_fraction=0.875,    # util/datasets.py: crop_pct 224 / 256.
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      num_workers=16,
      prefetch=2,
  ))

  config.model = ml_collections.ConfigDict(dict(
      encoder_from=placeholder(str),  # An export whose config gives the encoder (None: init_from).
      num_classes=1000,
      global_pool=True,            # main_finetune.py L114-115 (False: the normed [CLS] token).
      drop_path_rate=0.1,          # main_finetune.py L57; FINETUNE.md L73.
      head_init_std=2e-5,          # main_finetune.py L257: trunc_normal_(head.weight, std=2e-5).
      dtype='bfloat16',
      remat=False,
  ))

  config.augment = ml_collections.ConfigDict(dict(
      mixup=0.8,                   # FINETUNE.md L73 (--mixup 0.8).
      cutmix=1.0,                  # FINETUNE.md L73 (--cutmix 1.0).
      mixup_prob=1.0,              # main_finetune.py L104.
      mixup_switch_prob=0.5,       # main_finetune.py L106.
      smoothing=0.1,               # main_finetune.py L84.
  ))

  config.optim = optim_config(
      name='adamw', lr=5e-4,       # FINETUNE.md L72: --blr 5e-4; lr = blr * batch / 256 (L78).
      lr_scaling='linear', b1=0.9, b2=0.999,  # main_finetune.py L287: torch AdamW defaults.
      weight_decay=0.05,           # FINETUNE.md L73.
      layer_decay=0.65,            # FINETUNE.md L72.
      warmup_epochs=5.0,           # main_finetune.py L76.
      min_lr=1e-6,                 # main_finetune.py L73; util/lr_sched.py: half cosine.
      schedule='warmup_cosine')

  config.train = train_config(epochs=100.0)  # FINETUNE.md L71.

  # The fine-tuned classifier's top-1 on test_source is the online_probe evaluation.
  config.eval = eval_config(train_source='tfds:imagenet2012:train',
                            test_source='tfds:imagenet2012:validation',
                            online_probe=dict(enabled=True))
  config.eval.pool = 'patch_mean'  # Features for kNN / linear probes of the fine-tuned ViT.

  config.mesh = mesh_config(data=-1, fsdp=1, tensor=1)

  if variant == 'vit_l':
    config.optim.update(dict(lr=1e-3, layer_decay=0.75))  # FINETUNE.md L91.
    config.model.drop_path_rate = 0.2                     # FINETUNE.md L92.
    config.train.epochs = 50.0                            # FINETUNE.md L90.
  elif variant == 'local':
    _local(config)
  elif variant:
    raise ValueError(f'Unknown variant {variant!r} of finetune.py: use vit_l or local.')
  return config


def _local(config: ml_collections.ConfigDict) -> None:
  """CPU scale: the digits export of mae_vit.py:local (16 px, 1 channel), 2-3 minutes."""
  config.data.update(dict(
      source='digits:train', batch_size=128, image_size=16, channels=1,
      crop_scale=(0.35, 1.0), hflip=False,  # As mae_vit.py:local: mirrored digits are other glyphs.
      interpolation='bilinear', eval_crop_fraction=1.0, mean=(0.5,), std=(0.5,),
      num_workers=0))
  config.model.update(dict(num_classes=10, dtype='float32'))
  config.optim.update(dict(lr=1e-3, lr_scaling='none', warmup_epochs=None, warmup_steps=30))
  config.train.update(dict(steps=300, epochs=None, log_every=50, checkpoint_every=100,
                           eval_every=0))
  config.eval.update(dict(train_source='digits:train', test_source='digits:test',
                          batch_size=360))
