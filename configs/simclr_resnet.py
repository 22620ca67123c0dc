r"""SimCLR pretraining of a ResNet (Chen et al. 2020, "A Simple Framework for Contrastive ...").

Variants (`--config=configs/simclr_resnet.py:VARIANT`):
  (none)   the paper recipe: ResNet-50, ImageNet-1k, batch 4096, LARS lr 0.3 x batch/256,
           wd 1e-6, 10 warmup epochs + cosine, temperature 0.1, projection 2048-2048-128
           with BN, 1000 epochs (the 69.3% linear-probe run; the paper's ablations use 100).
  cifar10  the paper's CIFAR-10 setup as the official README runs it: ResNet-18 with a
           3x3 stem and no max-pool, batch 512, lr 1.0 x batch/256, wd 1e-4, temperature
           0.5, colour strength 0.5, no blur, 1000 epochs (`--config.model.depth=50` for R50).
  local    a narrow ResNet-18 on the embedded 8x8 digits: minutes on 2 CPU cores.

  python -m ssl_jax.main --config=configs/simclr_resnet.py:local --workdir=/tmp/simclr
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

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The SimCLR config; `variant` is the text after ':' in --config."""
  config = ml_collections.ConfigDict()
  config.method = 'simclr'
  config.seed = 0

  config.data = ml_collections.ConfigDict(dict(
      source='tfds:imagenet2012:train',
      tfds_dir=placeholder(str),
      batch_size=4096,             # Global, over all devices and hosts.
      image_size=224,              # Of the eval images; the views' size is augment.size.
      channels=3,
      interpolation='bicubic',     # SimCLR resizes crops with bicubic (data_util.py line 320).
      eval_crop_fraction=0.875,
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      num_workers=16,
      prefetch=2,
  ))

  # The two views. Geometry on the host, from the whole decoded image
  # (SimCLR.view_specs; google-research/simclr tf2/data_util.py crop_and_resize,
  # lines 298-320, and the flip at line 469); colour on device, in the jitted
  # step (device_augment.simclr_colour; data_util.py lines 53-75, 382-410).
  config.augment = ml_collections.ConfigDict(dict(
      size=224,                    # Each view is cropped and resized straight to this.
      crop_scale=(0.08, 1.0),      # area_range, data_util.py line 316.
      crop_ratio=(3 / 4, 4 / 3),   # aspect_ratio_range, line 315.
      flip=True,                   # random_flip_left_right (p 0.5), line 469.
      jitter_strength=1.0,         # Brightness/contrast/saturation 0.8 s, hue 0.2 s.
      jitter_prob=0.8,
      grayscale_prob=0.2,
      blur_prob=0.5,               # ImageNet only.
  ))

  config.model = ml_collections.ConfigDict(dict(
      depth=50,
      stem='imagenet',             # 7x7/2 conv + max-pool; 'cifar': 3x3/1, no pool.
      width_multiplier=1.0,
      zero_init_residual=True,     # As SimCLR's resnet.py: each block's last BN starts at 0.
      projection_hidden=2048,
      projection_dim=128,
      projection_layers=2,         # SimCLR v1: one hidden layer.
      temperature=0.1,
      num_classes=1000,            # Of the online linear probe.
      dtype='bfloat16',            # Compute dtype; parameters stay float32.
      remat='none',                # Per residual block: 'full', 'dots', ... (models/remat.py).
  ))

  config.optim = optim_config(
      name='lars', lr=0.3, lr_scaling='linear', weight_decay=1e-6, momentum=0.9,
      trust_coefficient=0.001, warmup_epochs=10.0, schedule='warmup_cosine')

  config.train = train_config(epochs=1000.0)

  # The online probe is scored on test_source; kNN (host-side voting) is off
  # for ImageNet, where it would be far too slow.
  config.eval = eval_config(train_source='tfds:imagenet2012:train',
                            test_source='tfds:imagenet2012:validation',
                            online_probe=dict(enabled=True), pictures=dict(enabled=True))

  config.mesh = mesh_config(data=-1, fsdp=1, tensor=1)

  if variant == 'cifar10':
    _cifar10(config)
  elif variant == 'local':
    _local(config)
  elif variant:
    raise ValueError(f'Unknown variant {variant!r} of simclr_resnet.py: use cifar10 or local.')
  return config


def _cifar10(config: ml_collections.ConfigDict) -> None:
  """google-research/simclr README's CIFAR-10 command (about 91% linear probe)."""
  config.data.update(dict(source='tfds:cifar10:train', batch_size=512, image_size=32,
                          eval_crop_fraction=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD))
  config.augment.update(dict(size=32, jitter_strength=0.5, blur_prob=0.0))
  config.model.update(dict(depth=18, stem='cifar', temperature=0.5, num_classes=10))
  # The README's CIFAR-10 command: --learning_rate=1.0 --weight_decay=1e-4 (README.md line 81).
  config.optim.update(dict(lr=1.0, weight_decay=1e-4))
  config.train.update(dict(log_every=50, eval_every=5000))
  config.eval.update(dict(train_source='tfds:cifar10:train', test_source='tfds:cifar10:test',
                          batch_size=1000))
  config.eval.knn.enabled = config.eval.linear_probe.enabled = True


def _local(config: ml_collections.ConfigDict) -> None:
  """CPU scale: a quarter-width ResNet-18 on the 8 px digits, a few minutes on 2 cores.

  The digits stay at their native 8x8: XLA's CPU convolution gradients are
  slow, and 16 px (4x the work) learns no better here.

  No zero-init of the residual branches (SimCLR's resnet.py and the paper
  variants start each block's last BatchNorm at 0): over a few hundred steps
  it only slows learning, and it makes the random-init baseline degenerate
  (every image's features alike: kNN 0.20), so "beats a random encoder" would
  say nothing. Measured on this job: kNN / linear / online probe 0.981 /
  0.981 / 0.978 against 0.847 / 0.869 at random init; with zero-init 0.978 /
  0.978 / 0.961 against 0.20 / 0.20.
  """
  config.data.update(dict(
      source='digits:train', batch_size=256, image_size=8, channels=1,
      interpolation='bilinear', eval_crop_fraction=1.0, mean=(0.5,), std=(0.5,),
      num_workers=0))
  config.augment.update(dict(size=8, crop_scale=(0.3, 1.0), flip=False,
                             jitter_strength=0.5, blur_prob=0.0))
  config.model.update(dict(depth=18, stem='cifar', width_multiplier=0.25, zero_init_residual=False,
                           projection_hidden=128, projection_dim=64, temperature=0.5,
                           num_classes=10, dtype='float32'))
  config.optim.update(dict(lr=1.0, warmup_epochs=None, warmup_steps=40))
  config.train.update(dict(steps=400, epochs=None, log_every=25, checkpoint_every=200,
                           eval_every=200))
  config.eval.update(dict(train_source='digits:train', test_source='digits:test',
                          batch_size=360, random_init_baseline=True))
  config.eval.knn.enabled = config.eval.linear_probe.enabled = True
