r"""MAE pretraining of a ViT (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners").

Variants (`--config=configs/mae_vit.py:VARIANT`):
  (none)  the paper recipe: ViT-B/16, 224 px, ImageNet-1k, batch 4096, 800 epochs.
  vit_l   ViT-L/16, otherwise the paper recipe (the paper's best runs use 1600 epochs).
  vit_h   ViT-H/14 (632M encoder), otherwise the paper recipe; blocks rematerialised,
          8 micro-batches; for 80 GB devices with --config.mesh.fsdp=8 (dry run:
          16.3 GiB a device on XLA:CPU, README "Big models and dry runs").
  local   a small ViT on the embedded 8x8 digits: minutes on 2 CPU cores.

  python -m ssl_jax.main --config=configs/mae_vit.py:local --workdir=/tmp/mae
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

# ViT sizes (Dosovitskiy et al. 2021, Table 1): patch, width, depth, heads, MLP. The MAE
# code's models: facebookresearch/mae models_mae.py L223-244 (`mae_vit_base_patch16_dec512d8b`,
# `..._large_...`, `mae_vit_huge_patch14_dec512d8b`: the same encoders, mlp_ratio 4, and every
# one the same 512-wide, 8-deep, 16-head decoder as the default below).
VIT_SIZES = {
    'B/16': dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
    'L/16': dict(patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096),
    'H/14': dict(patch_size=14, width=1280, depth=32, num_heads=16, mlp_dim=5120),
}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The MAE config; `variant` is the text after ':' in --config."""
  config = ml_collections.ConfigDict()
  config.method = 'mae'
  config.seed = 0

  config.data = ml_collections.ConfigDict(dict(
      source='tfds:imagenet2012:train',
      tfds_dir=placeholder(str),
      batch_size=4096,             # Global, over all devices and hosts.
      image_size=224,
      channels=3,
      crop_scale=(0.2, 1.0),       # MAE uses RandomResizedCrop(0.2, 1) + flip only.
      crop_ratio=(3 / 4, 4 / 3),
      hflip=True,
      interpolation='bicubic',     # torchvision interpolation=3, as the MAE code.
      eval_crop_fraction=0.875,
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      num_workers=16,
      prefetch=2,
  ))

  config.model = ml_collections.ConfigDict(dict(
      **VIT_SIZES['B/16'],
      decoder_width=512,
      decoder_depth=8,
      decoder_heads=16,
      decoder_mlp_dim=2048,
      mask_ratio=0.75,
      norm_pix_loss=True,
      dtype='bfloat16',            # Compute dtype; parameters stay float32.
      remat='none',                 # Or 'full', 'dots', ... (ssl_jax/models/remat.py).
  ))

  config.optim = optim_config(
      name='adamw', lr=1.5e-4, lr_scaling='linear', b1=0.9, b2=0.95,
      weight_decay=0.05, warmup_epochs=40.0, schedule='warmup_cosine')

  config.train = train_config(epochs=800.0)

  # Labelled splits for the probes, e.g. 'tfds:imagenet2012:train' and
  # 'tfds:imagenet2012:validation'. kNN is off in the paper recipe: the MAE
  # paper reports none, and this probe votes on the host, far too slowly for
  # ImageNet's 1.28M training images.
  config.eval = eval_config(pictures=dict(enabled=True))
  config.eval.pool = 'cls'  # Feature for probes: 'cls' (MAE linear probe) or 'patch_mean'.

  config.mesh = mesh_config(data=-1, fsdp=1, tensor=1)

  if variant == 'vit_l':
    config.model.update(VIT_SIZES['L/16'])
  elif variant == 'vit_h':
    _vit_h(config)
  elif variant == 'local':
    _local(config)
  elif variant:
    raise ValueError(f'Unknown variant {variant!r} of mae_vit.py: use vit_l, vit_h or local.')
  return config


def _vit_h(config: ml_collections.ConfigDict) -> None:
  """ViT-H/14 (mae_vit_huge_patch14_dec512d8b), meant for 80 GB devices under fsdp=8."""
  config.model.update(VIT_SIZES['H/14'])
  # Batch 4096 on 8 devices is 512 images a device: the dry run puts their activations at
  # ~100 GB. The reference keeps 64 images a GPU and accumulates when memory is short
  # (PRETRAIN.md L18; main_pretrain.py L43 --accum_iter): 8 micro-batches of 512 give 64 a
  # device on 8 devices, the same update as one batch of 4096. Blocks are rematerialised
  # too (README, "Big models and dry runs").
  config.model.remat = 'full'
  config.train.grad_accum_steps = 8


def _local(config: ml_collections.ConfigDict) -> None:
  """CPU scale: a 4-block ViT on 16 px digits (16 patches), a few minutes on 2 cores."""
  config.data.update(dict(
      source='digits:train', batch_size=128, image_size=16, channels=1,
      crop_scale=(0.35, 1.0), hflip=False,  # Mirrored digits are other glyphs.
      interpolation='bilinear',             # What the :local recipe was tuned with.
      eval_crop_fraction=1.0, mean=(0.5,), std=(0.5,), num_workers=0))
  config.model.update(dict(
      patch_size=4, width=128, depth=4, num_heads=4, mlp_dim=256,
      decoder_width=64, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=128,
      dtype='float32'))
  config.optim.update(dict(lr=2e-3, lr_scaling='none', warmup_epochs=None, warmup_steps=100))
  config.train.update(dict(steps=1000, epochs=None, log_every=50, checkpoint_every=250,
                           eval_every=500))
  config.eval.update(dict(train_source='digits:train', test_source='digits:test',
                          batch_size=360, random_init_baseline=True))
  config.eval.knn.enabled = config.eval.linear_probe.enabled = True
