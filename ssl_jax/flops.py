"""Analytic training FLOPs of the models, the numerator of MFU.

The count is the convention of PaLM (Chowdhery et al. 2022, appendix B) and
nanoGPT's `estimate_mfu`: every matmul weight a token meets costs 2 FLOPs
forward and 4 backward (6 per token per weight), plus attention's two
(T x T) products, 12 x depth x T^2 x width per sequence. Elementwise work
(norms, softmax, GELU, the optimizer update) is left out, so XLA's own count
of a compiled step (`ssl_jax.bench`) is a little larger.

Convolutions follow the same rule: 2 FLOPs per multiply-add forward, 3x that
for a training step (activation and weight gradients). Only taps on the
image count, not those on its zero padding, as XLA counts; with them
(`padded=True`) the count is torchvision's model table (1.81 / 4.09 GMACs for
ResNet-18 / 50 at 224 px, `tests/test_flops.py`): 8% / 4% more at 224 px,
1.15x more at 32 px and 1.77x for SimCLR's `:local` 8 px images (ResNet-18).
Forward-only work (DINO's teacher) counts 2 per weight per token.
"""

from collections.abc import Sequence

import ml_collections

from ssl_jax.models.resnet import BLOCKS, RESNET_SIZES, stage_widths


def transformer_train_flops(tokens: int, width: int, mlp_dim: int, depth: int) -> float:
  """Forward + backward FLOPs of `depth` pre-norm blocks over one sequence of `tokens`."""
  weights = depth * (4 * width * width + 2 * width * mlp_dim)  # qkv + proj, MLP in + out.
  return float(6 * weights * tokens + 12 * depth * tokens ** 2 * width)


def vit_train_flops(image_size: int, patch_size: int, channels: int, width: int, mlp_dim: int,
                    depth: int) -> float:
  """Forward + backward FLOPs of a ViT on one image: patch embedding, blocks on [CLS] + patches."""
  patches = (image_size // patch_size) ** 2
  embedding = 6 * patches * patch_size ** 2 * channels * width
  return embedding + transformer_train_flops(1 + patches, width, mlp_dim, depth)


def mlp_weights(dims: Sequence[int]) -> int:
  """Matmul weights of a stack of linears through `dims` (in, hidden..., out)."""
  return sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))


def _conv(size: int, cin: int, cout: int, kernel: int, stride: int,
          padded: bool) -> tuple[int, float]:
  """Output size and forward FLOPs of a k x k conv with torch padding k // 2, per image.

  `padded` counts every k x k tap of every output (torchvision's table);
  otherwise only taps that land on the image, not on its zero padding (what
  XLA's cost analysis counts, and the work a model needs: at CPU sizes, 8 px
  images down to 1 x 1, most of a 3x3 conv's taps are padding).
  """
  pad = kernel // 2
  out = (size + 2 * pad - kernel) // stride + 1
  taps = out * kernel if padded else sum(
      0 <= o * stride + i - pad < size for o in range(out) for i in range(kernel))
  return out, 2.0 * taps * taps * cin * cout


def _block(block: str, size: int, cin: int, width: int, stride: int,
           padded: bool) -> tuple[int, int, float]:
  """Output size, channels and forward FLOPs of one residual block (models/resnet.py)."""
  if block == 'basic':
    out, first = _conv(size, cin, width, 3, stride, padded)
    _, second = _conv(out, width, width, 3, 1, padded)
    cout, total = width, first + second
  else:  # Bottleneck v1.5: 1x1 reduce, 3x3 with the stride, 1x1 expand by 4.
    _, reduce = _conv(size, cin, width, 1, 1, padded)
    out, middle = _conv(size, width, width, 3, stride, padded)
    cout = BLOCKS['bottleneck'].expansion * width
    total = reduce + middle + _conv(out, width, cout, 1, 1, padded)[1]
  if stride != 1 or cin != cout:  # Projection shortcut.
    total += _conv(size, cin, cout, 1, stride, padded)[1]
  return out, cout, total


def resnet_forward_flops(model: ml_collections.ConfigDict, image_size: int, channels: int, *,
                         padded: bool = False) -> float:
  """Forward FLOPs of one square image through `models.resnet.ResNet` (convs, no classifier).

  Taps on zero padding count only with `padded` (see `_conv`).
  """
  block, stage_sizes = RESNET_SIZES[model.depth]
  widths = stage_widths(model.width_multiplier)
  imagenet = model.stem == 'imagenet'
  size, total = _conv(image_size, channels, widths[0], 7 if imagenet else 3,
                      2 if imagenet else 1, padded)
  if imagenet:  # 3x3 stride-2 max-pool, padding 1.
    size = (size - 1) // 2 + 1
  cin = widths[0]
  for index, (width, num_blocks) in enumerate(zip(widths, stage_sizes, strict=True)):
    for position in range(num_blocks):
      stride = 2 if index > 0 and position == 0 else 1
      size, cin, flops = _block(block, size, cin, width, stride, padded)
      total += flops
  return total


def resnet_features(model: ml_collections.ConfigDict) -> int:
  """Width of a ResNet's pooled features."""
  block, _ = RESNET_SIZES[model.depth]
  return stage_widths(model.width_multiplier)[-1] * BLOCKS[block].expansion


def simclr_train_flops(config: ml_collections.ConfigDict) -> float:
  """One image's SimCLR training FLOPs: two views through ResNet and projector, NT-Xent, probe.

  The NT-Xent similarities are a (2B, 2B) matmul over the projection: 6 (2B)^2
  dim per batch, 24 B dim per image, so the count depends on the batch size.
  """
  m, batch = config.model, config.data.batch_size
  features = resnet_features(m)
  projector = mlp_weights([features] + [m.projection_hidden] * (m.projection_layers - 1)
                          + [m.projection_dim])
  views = 2 * (3 * resnet_forward_flops(m, config.augment.size, config.data.channels)
               + 6 * projector)
  return views + 24 * batch * m.projection_dim + 6 * features * m.num_classes


def dino_train_flops(config: ml_collections.ConfigDict) -> float:
  """One image's DINO training FLOPs: the student on every crop, the teacher's forward on 2.

  As main_dino.py's train_one_epoch: the student (ViT + head) runs forward
  and backward on 2 global and `num_local_crops` local crops, the teacher
  forward only on the 2 global ones. The head is `head_layers` linears and
  the (bottleneck, out_dim) last layer.
  """
  m, a, channels = config.model, config.augment, config.data.channels
  head = mlp_weights([m.width] + [m.head_hidden_dim] * (m.head_layers - 1)
                     + [m.head_bottleneck_dim, m.out_dim])
  def student(size: int) -> float:
    return vit_train_flops(size, m.patch_size, channels, m.width, m.mlp_dim, m.depth) + 6 * head
  crops = 2 * student(a.global_size) + a.num_local_crops * student(a.local_size)
  return crops + 2 * student(a.global_size) / 3


def mae_train_flops(config: ml_collections.ConfigDict) -> float:
  """One image's MAE training FLOPs: the encoder on the visible patches, the decoder on all.

  As in models_mae.py (facebookresearch/mae): the patch embedding runs on
  every patch before masking, the encoder on [CLS] + the kept (1 - mask_ratio)
  share, the decoder (embed, blocks, prediction) on [CLS] + every patch.
  """
  m, data = config.model, config.data
  patches = (data.image_size // m.patch_size) ** 2
  pixels = m.patch_size ** 2 * data.channels
  visible = 1 + int(patches * (1 - m.mask_ratio))
  matmuls = (patches * pixels * m.width + visible * m.width * m.decoder_width
             + (1 + patches) * m.decoder_width * pixels)
  return (6 * matmuls
          + transformer_train_flops(visible, m.width, m.mlp_dim, m.depth)
          + transformer_train_flops(1 + patches, m.decoder_width, m.decoder_mlp_dim,
                                    m.decoder_depth))
