"""Analytic FLOPs (ssl_jax/flops.py): published ResNet counts, counts by hand, XLA's count."""

import importlib

import jax
import ml_collections
import pytest

from ssl_jax import flops, methods
from ssl_jax.dry_run import dry_config, dry_run
from ssl_jax.methods.finetune import FineTune


@pytest.mark.parametrize('depth,gmacs', [(18, 1.81), (50, 4.09)])
def test_resnet_matches_torchvision_model_table(depth, gmacs):
  # torchvision's ResNet18/50_Weights.IMAGENET1K_V1 "GFLOPS" (multiply-adds, 224 px),
  # which include the 1000-way fc (0.5 / 2.0 M): ours have no classifier.
  model = ml_collections.ConfigDict(dict(depth=depth, stem='imagenet', width_multiplier=1))
  fc = flops.resnet_features(model) * 1000
  assert flops.resnet_features(model) == (512 if depth == 18 else 2048)
  assert round((flops.resnet_forward_flops(model, 224, 3, padded=True) / 2 + fc) / 1e9, 2) == gmacs
  # Without the taps on padding: 7% (ResNet-18, last stage 7x7 with 3x3 convs) or 3% less.
  assert 0.92 < flops.resnet_forward_flops(model, 224, 3) / flops.resnet_forward_flops(
      model, 224, 3, padded=True) < 0.97


def test_resnet_cifar_stem_by_hand():
  # ResNet-18, CIFAR stem, width 1/4 (16 ... 128 channels), one 8x8 grey image.
  model = ml_collections.ConfigDict(dict(depth=18, stem='cifar', width_multiplier=0.25))
  stem = 9 * 1 * 16 * 64
  stage1 = 2 * 2 * 9 * 16 * 16 * 64                           # 4 convs 16 -> 16 at 8x8.
  stage2 = (9 * 16 * 32 + 9 * 32 * 32 + 16 * 32) * 16 + 2 * 9 * 32 * 32 * 16  # to 4x4.
  stage3 = (9 * 32 * 64 + 9 * 64 * 64 + 32 * 64) * 4 + 2 * 9 * 64 * 64 * 4    # to 2x2.
  stage4 = (9 * 64 * 128 + 9 * 128 * 128 + 64 * 128) * 1 + 2 * 9 * 128 * 128  # to 1x1.
  assert flops.resnet_forward_flops(model, 8, 1, padded=True) == 2 * (
      stem + stage1 + stage2 + stage3 + stage4)


def test_taps_on_padding_are_left_out():
  # A 3x3 conv, padding 1, on a 2x2 image: each output meets 2 x 2 image pixels
  # (of its 3 x 3 taps), so 4 outputs x 4 taps x 5 x 7 channels, x 2 FLOPs.
  assert flops._conv(2, 5, 7, 3, 1, padded=False) == (2, 2.0 * 16 * 35)
  assert flops._conv(2, 5, 7, 3, 1, padded=True) == (2, 2.0 * 36 * 35)
  # Stride 2 on 5 px, padding 1: outputs at -1..1, 1..3, 3..5; 2 + 3 + 2 taps per axis.
  assert flops._conv(5, 1, 1, 3, 2, padded=False) == (3, 2.0 * 7 * 7)


def test_dino_by_hand():
  config = ml_collections.ConfigDict(dict(
      data=dict(channels=1),
      augment=dict(global_size=8, local_size=4, num_local_crops=2),
      model=dict(patch_size=4, width=8, depth=1, mlp_dim=16, head_hidden_dim=6,
                 head_bottleneck_dim=3, head_layers=2, out_dim=5)))
  head = 8 * 6 + 6 * 3 + 3 * 5
  def vit(tokens, patches):  # Patch embedding, then one block ([CLS] + patches tokens).
    return 6 * (patches * 16 * 8 + tokens * (4 * 8 * 8 + 2 * 8 * 16)) + 12 * tokens ** 2 * 8
  student_global, student_local = vit(5, 4) + 6 * head, vit(2, 1) + 6 * head
  teacher = 2 * (vit(5, 4) + 6 * head) / 3  # Forward only: 2 of the 6 FLOPs per weight.
  assert flops.dino_train_flops(config) == 2 * student_global + 2 * student_local + teacher


@pytest.mark.parametrize('source', ['mae', 'simclr'])
def test_finetune_counts_its_encoder_and_head(source):
  # FineTune's count needs only its config and the export's (no weights are read).
  method = FineTune.__new__(FineTune)
  method.config = ml_collections.ConfigDict(dict(
      data=dict(image_size=32, channels=3), model=dict(num_classes=10)))
  model = (dict(patch_size=4, width=16, depth=2, mlp_dim=32) if source == 'mae' else
           dict(depth=18, stem='cifar', width_multiplier=0.25))
  method.source = ml_collections.ConfigDict(dict(method=source, model=model))
  if source == 'mae':
    encoder, width = flops.vit_train_flops(32, 4, 3, 16, 32, 2), 16
  else:
    encoder, width = 3 * flops.resnet_forward_flops(method.source.model, 32, 3), 128
  assert method.train_flops_per_example() == encoder + 6 * width * 10


@pytest.mark.parametrize('name,overrides,bounds', [
    # Measured 1.04. Counting the conv taps on zero padding too (padded=True) it
    # would be 0.90 at 32 px, 0.60 at the :local 8 px: XLA counts only taps on the image.
    ('simclr_resnet', {'data.batch_size': 32, 'data.image_size': 32, 'augment.size': 32},
     (1.0, 1.3)),
    # Wide enough that the matmuls dominate the on-device colour augmentation.
    ('dino_vit', {'data.batch_size': 16, 'data.image_size': 32, 'augment.global_size': 32,
                  'augment.local_size': 16, 'model.width': 256, 'model.mlp_dim': 1024,
                  'model.depth': 2}, (1.0, 1.3)),  # Measured 1.07.
])
def test_xla_counts_about_the_analytic_flops(name, overrides, bounds):
  """The compiled train step's XLA count is the analytic one plus elementwise work.

  A crop, view or pass counted twice or left out moves the ratio by a third or more.
  """
  config = importlib.import_module(f'configs.{name}').get_config('local')
  config.update_from_flattened_dict(overrides)
  method_class = methods.method_class(config)
  analytic = method_class(dry_config(config, method_class.data_spec(
      config))).train_flops_per_example() * config.data.batch_size
  figures = dry_run(config)
  xla = figures['flops_per_step_per_device'] * jax.device_count()
  assert bounds[0] < xla / analytic < bounds[1], (xla, analytic)
