"""ResNet v1.5 (He et al. 2016, as torchvision builds it) in Flax NNX, SimCLR's encoder.

Layout, padding and initialisation follow torchvision's `models/resnet.py`:
the stride of a bottleneck block sits on its 3x3 conv ("v1.5"), convs have
no bias and kaiming-normal (fan_out, relu) weights, BatchNorm has eps 1e-5
and torch momentum 0.1 (flax momentum 0.9), so `from_torch_state_dict`
copies torchvision weights one-to-one. SimCLR additions (Chen et al. 2020):
the CIFAR stem of its appendix B.9 and its `width_multiplier`.

BatchNorm statistics are plain means over the batch axis. Inside one
`jax.jit` with the batch sharded over devices they are global ("sync" BN,
SimCLR's `global_bn`) with no axis_name. Train/eval is an argument
(`train=`), not `model.eval()`, so the graphdef never changes.

Where SimCLR's TF ResNet (google-research/simclr resnet.py) differs, we
follow torchvision: its convs start from variance_scaling (fan_in, scale 1,
truncated normal), its max-pool pads 'SAME' (0, 1), and it always zero-inits
the last BN of each block (`zero_init_residual=True` here).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssl_jax.errors import ConfigError
from ssl_jax.models.initializers import partitioned
from ssl_jax.models.remat import checkpointed, policy_name
from ssl_jax.models.strided_conv import conv_general_dilated

Dtype = Any

# depth -> (block, blocks per stage), torchvision's resnet18 ... resnet152.
RESNET_SIZES = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)
STEMS = ('imagenet', 'cifar')
BN_MOMENTUM = 0.9  # Flax convention: new = 0.9 * old + 0.1 * batch (torch's momentum=0.1).
BN_EPSILON = 1e-5


def materialized(x: jax.Array) -> jax.Array:
  """`x` itself (an exact division by one), which XLA:CPU computes once rather than per consumer.

  A convolution's kernel gradient on XLA:CPU reads its input transposed to
  (C, H, W, N). XLA fuses the ops that produce that input (BatchNorm, ReLU,
  the residual adds of earlier blocks) into the transposing copy, recomputing
  them there with the image-strided reads of a transpose: 100-325 ms per
  copy of a (512, 32, 32, 16) activation, against ~18 ms for a plain
  transpose (docs/benchmarks.md, "Kept", 30 November). XLA does not
  duplicate an expensive op (a floating-point divide) into a second
  consumer, so the activation is written once, by the forward pass, and the
  backward transposes it plainly. The barrier keeps the divisor from being
  folded to a constant. On other backends `x` as it is: there convolutions
  fuse their producers (TPU) or read activations from memory anyway.
  """
  if jax.default_backend() != 'cpu':
    return x
  return x / jax.lax.optimization_barrier(jnp.ones((), x.dtype))


# torchvision: nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu'),
# i.e. an untruncated normal with variance 2 / (out_channels * kh * kw).
kaiming_normal_fan_out = jax.nn.initializers.variance_scaling(
    2.0, 'fan_out', 'normal', in_axis=-2, out_axis=-1)


def conv(in_features: int, out_features: int, kernel: int, stride: int = 1, *,
         in_logical_axis: str | None = 'conv_in', dtype: Dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """Bias-free k x k conv with torch's symmetric padding k // 2 (not XLA's 'SAME').

  Stride-2 convs take their input gradients from `strided_conv` on CPU.
  """
  # 'SAME' pads (0, 1) for stride 2 on even sizes; torch pads (1, 1). Explicit
  # padding keeps the sampling grid, and so copied weights, identical.
  pad = kernel // 2
  return nnx.Conv(
      in_features, out_features, (kernel, kernel), strides=stride,
      padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype, rngs=rngs,
      conv_general_dilated=conv_general_dilated,
      kernel_init=partitioned(kaiming_normal_fan_out, None, None, in_logical_axis, 'conv_out'))


def batch_norm(features: int, *, zero_init: bool = False, dtype: Dtype,
               rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm like torchvision's, with scale, bias and statistics on 'conv_out'."""
  norm = nnx.BatchNorm(
      features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs,
      # Flax's default one-pass variance E[x^2] - E[x]^2 (one fused reduction, in
      # float32 even for bf16 inputs) matched torch's two-pass one within float32
      # noise on ResNet-18/50 outputs and running statistics.
      scale_init=partitioned(nnx.initializers.zeros if zero_init else nnx.initializers.ones,
                             'conv_out'),
      bias_init=partitioned(nnx.initializers.zeros, 'conv_out'))
  # nnx.BatchNorm creates its statistics unannotated (replicated); give them
  # the channel sharding of scale and bias so the state shards consistently.
  norm.mean = nnx.BatchStat(norm.mean[...], out_sharding=('conv_out',))
  norm.var = nnx.BatchStat(norm.var[...], out_sharding=('conv_out',))
  return norm


class Projection(nnx.Module):
  """Projection shortcut: strided 1x1 conv + BN (torchvision's `downsample`)."""

  def __init__(self, in_features: int, out_features: int, stride: int, *, dtype: Dtype,
               rngs: nnx.Rngs):
    self.conv = conv(in_features, out_features, 1, stride, dtype=dtype, rngs=rngs)
    self.bn = batch_norm(out_features, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, C_in) -> (B, H / stride, W / stride, C_out)."""
    return self.bn(self.conv(x), use_running_average=not train)


class BasicBlock(nnx.Module):
  """Two 3x3 convs with a residual (ResNet-18/34)."""

  expansion = 1

  def __init__(self, in_features: int, width: int, stride: int, *, zero_init_residual: bool,
               dtype: Dtype, rngs: nnx.Rngs):
    self.conv1 = conv(in_features, width, 3, stride, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv2 = conv(width, width, 3, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(width, zero_init=zero_init_residual, dtype=dtype, rngs=rngs)
    self.shortcut = Projection(in_features, width, stride, dtype=dtype, rngs=rngs) if (
        stride != 1 or in_features != width) else None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, C_in) -> (B, H / stride, W / stride, width)."""
    x = materialized(x)
    y = materialized(jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train)))
    y = self.bn2(self.conv2(y), use_running_average=not train)
    shortcut = x if self.shortcut is None else self.shortcut(x, train=train)
    return jax.nn.relu(y + shortcut)


class Bottleneck(nnx.Module):
  """1x1 reduce, 3x3 (carrying the stride: v1.5), 1x1 expand by 4, residual."""

  expansion = 4

  def __init__(self, in_features: int, width: int, stride: int, *, zero_init_residual: bool,
               dtype: Dtype, rngs: nnx.Rngs):
    out_features = width * self.expansion
    self.conv1 = conv(in_features, width, 1, dtype=dtype, rngs=rngs)
    self.bn1 = batch_norm(width, dtype=dtype, rngs=rngs)
    # v1.5: the stride sits on the 3x3 conv (torchvision, SimCLR's TF code), not on
    # the first 1x1 as in the paper; NVIDIA's DeepLearningExamples measured ~0.5%
    # better top-1 for ~5% lower throughput.
    self.conv2 = conv(width, width, 3, stride, dtype=dtype, rngs=rngs)
    self.bn2 = batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv3 = conv(width, out_features, 1, dtype=dtype, rngs=rngs)
    self.bn3 = batch_norm(out_features, zero_init=zero_init_residual, dtype=dtype, rngs=rngs)
    self.shortcut = Projection(in_features, out_features, stride, dtype=dtype, rngs=rngs) if (
        stride != 1 or in_features != out_features) else None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """(B, H, W, C_in) -> (B, H / stride, W / stride, 4 * width)."""
    x = materialized(x)
    y = materialized(jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train)))
    y = materialized(jax.nn.relu(self.bn2(self.conv2(y), use_running_average=not train)))
    y = self.bn3(self.conv3(y), use_running_average=not train)
    shortcut = x if self.shortcut is None else self.shortcut(x, train=train)
    return jax.nn.relu(y + shortcut)


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


def stage_widths(width_multiplier: float) -> list[int]:
  """The four stages' widths (their 3x3 convs' channels) at `width_multiplier`."""
  # SimCLR's width multiplier scales every conv, stem included (simclr/resnet.py),
  # unlike torchvision's wide_resnet50_2, which widens only the bottleneck's inner 3x3.
  # Fractions (0.25: 16 ... 128 channels) make CPU-sized models.
  return [round(w * width_multiplier) for w in STAGE_WIDTHS]


class ResNet(nnx.Module):
  """ResNet v1.5 encoder without the classifier: stem, four stages, global average pool."""

  def __init__(self, depth: int = 50, *, stem: str = 'imagenet', width_multiplier: float = 1,
               channels: int = 3, zero_init_residual: bool = False,
               stage_sizes: Sequence[int] | None = None, dtype: Dtype = jnp.float32,
               remat: Any = False, rngs: nnx.Rngs):
    """ResNet-`depth` (a RESNET_SIZES key) for `channels`-channel images.

    `stem` is 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv,
    no pool). `width_multiplier` scales every conv's channels.
    `zero_init_residual` starts each block's last BN at gamma = 0
    (torchvision's option; SimCLR's TF code always does it). `stage_sizes`
    replaces the blocks per stage of `depth` (1 to 4 stages, e.g. (1, 1) for
    tiny test models); the block type still follows `depth`. `remat` names
    the policy each residual block is rematerialised with (`models.remat`).
    """
    if depth not in RESNET_SIZES:
      raise ConfigError(f'ResNet depth must be one of {sorted(RESNET_SIZES)}, got {depth}')
    block, default_sizes = RESNET_SIZES[depth]
    stage_sizes = tuple(default_sizes if stage_sizes is None else stage_sizes)
    if stem not in STEMS:
      raise ConfigError(f'ResNet stem must be one of {STEMS}, got {stem!r}')
    if not 1 <= len(stage_sizes) <= len(STAGE_WIDTHS) or min(stage_sizes) < 1:
      raise ConfigError(f'ResNet stage_sizes must be 1 to {len(STAGE_WIDTHS)} positive block '
                        f'counts, got {stage_sizes}')
    if width_multiplier <= 0 or not float(64 * width_multiplier).is_integer():
      raise ConfigError(f'ResNet width_multiplier must be positive with 64 x it a whole number '
                        f'of channels (SimCLR: 1, 2, 4; 0.25 for CPU runs), '
                        f'got {width_multiplier}')
    self.stem = stem
    self.channels = channels
    self.dtype = dtype
    self.remat = policy_name(remat)
    block_cls = BLOCKS[block]
    widths = stage_widths(width_multiplier)
    # SimCLR appendix B.9: for 32x32 CIFAR a 3x3 stride-1 conv and no max-pool.
    kernel, stride = (7, 2) if stem == 'imagenet' else (3, 1)
    # The stem's input (3 colours) is left unsharded: no mesh axis divides it,
    # so a rule mapping 'conv_in' to a mesh axis would fail here. (Such a rule
    # is not advised: with 'conv_in' -> 'fsdp', 'conv_out' -> 'tensor' on a
    # 2x2x2 mesh, jax 0.10.2 on CPU computed wrong conv weight gradients.)
    self.stem_conv = conv(channels, widths[0], kernel, stride, in_logical_axis=None,
                          dtype=dtype, rngs=rngs)
    self.stem_bn = batch_norm(widths[0], dtype=dtype, rngs=rngs)
    stages, in_features = [], widths[0]
    for index, (width, num_blocks) in enumerate(zip(widths, stage_sizes, strict=False)):
      blocks = []
      for position in range(num_blocks):
        stride = 2 if index > 0 and position == 0 else 1
        blocks.append(block_cls(in_features, width, stride, dtype=dtype, rngs=rngs,
                                zero_init_residual=zero_init_residual))
        in_features = width * block_cls.expansion
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.num_features = in_features  # D of `pooled`: 512 (18/34) or 2048 (50+) x multiplier.

  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """(B, H, W, C) float images -> dict of intermediates (big_vision style).

    `train=True` normalises with batch statistics and updates the running
    averages; `train=False` uses the running averages and changes nothing.
    Returns `stem` (after BN, ReLU and any max-pool), `stage1`... (each
    stage's output), `feature_map` (the last stage, (B, H/32, W/32, D) for
    the ImageNet stem, (B, H/8, W/8, D) for CIFAR) and `pooled` (B, D), the
    global average pool SimCLR uses as the representation.
    """
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f'ResNet expects (B, H, W, {self.channels}) images, got {images.shape}')
    x = self.stem_conv(materialized(images.astype(self.dtype)))
    x = jax.nn.relu(self.stem_bn(x, use_running_average=not train))
    if self.stem == 'imagenet':
      # torch's MaxPool2d(3, 2, padding=1) pads with -inf, as reduce_window does.
      x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    out = {'stem': x}
    for index, stage in enumerate(self.stages):
      for block in stage:
        x = checkpointed(lambda blk, h: blk(h, train=train), self.remat)(block, x)
      out[f'stage{index + 1}'] = x
    out['feature_map'] = x
    out['pooled'] = x.mean(axis=(1, 2))
    return out


# ------------------------------------------------------------------------------
# torchvision weights.
# ------------------------------------------------------------------------------
_TORCH_MODULES = {'stem_conv': 'conv1', 'stem_bn': 'bn1', 'shortcut': 'downsample',
                  'conv': '0', 'bn': '1'}  # conv / bn occur only inside the shortcut.
_TORCH_VARIABLES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
                    'mean': 'running_mean', 'var': 'running_var'}


def torch_name(path: Sequence[Any]) -> str:
  """Our variable path, e.g. ('stages', 0, 1, 'bn2', 'scale') -> 'layer1.1.bn2.weight'."""
  parts = [str(p) for p in path]
  if parts[0] == 'stages':  # torchvision names its stages layer1 .. layer4.
    parts = [f'layer{int(parts[1]) + 1}', *parts[2:]]
  modules = [_TORCH_MODULES.get(p, p) for p in parts[:-1]]
  return '.'.join([*modules, _TORCH_VARIABLES[parts[-1]]])


def _concrete_sharding(value: Any) -> jax.sharding.Sharding | None:
  """The sharding of an array, or of a ShapeDtypeStruct on the current mesh."""
  placement = getattr(value, 'sharding', None)
  if isinstance(placement, jax.sharding.NamedSharding) and isinstance(
      placement.mesh, jax.sharding.AbstractMesh):
    return jax.sharding.NamedSharding(jax.sharding.get_mesh(), placement.spec)
  return placement


def from_torch_state_dict(model: ResNet, state_dict: Mapping[str, Any]) -> None:
  """Copies a torchvision ResNet state dict (arrays, NCHW) into `model` in place.

  Pass `{k: v.numpy() for k, v in torch_model.state_dict().items()}`; `fc.*`
  and `num_batches_tracked` are ignored. `model` may be abstract
  (`nnx.eval_shape(lambda: ResNet(...))`), which skips the random init.
  torch folds the unbiased batch variance into `running_var`, flax the
  biased one: a factor n / (n - 1) on each update, n = batch x height x
  width values per channel, which is negligible at training batch sizes.
  """
  flat = nnx.to_flat_state(nnx.state(model))
  used, updates = set(), []
  for path, variable in flat:
    key = torch_name(path)
    if key not in state_dict:
      raise KeyError(f'torch state dict has no {key!r} for {"/".join(map(str, path))}; '
                     'is it a torchvision ResNet of the same depth and stem?')
    value = np.asarray(state_dict[key], dtype=np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
    old = variable.get_value()  # An array, or a ShapeDtypeStruct in an abstract model.
    if value.shape != old.shape:
      raise ValueError(f'{key}: torch shape gives {value.shape}, model has {old.shape}')
    used.add(key)
    updates.append((path, variable.replace(
        jax.device_put(value.astype(old.dtype), _concrete_sharding(old)))))
  unused = sorted(k for k in state_dict if k not in used and not k.startswith('fc.')
                  and not k.endswith('num_batches_tracked'))
  if unused:
    raise KeyError(f'{len(unused)} torch state dict entries have no place in the model, '
                   f'e.g. {unused[:3]}; is it a torchvision ResNet of the same depth and stem?')
  nnx.update(model, nnx.from_flat_state(updates))
