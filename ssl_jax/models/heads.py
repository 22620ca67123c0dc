"""Heads that sit on an encoder's pooled features: projection MLPs and linear probes."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssl_jax.models.initializers import partitioned, torch_default_uniform, torch_trunc_normal


def batch_norm(features: int, *, use_bias: bool = True, rngs: nnx.Rngs) -> nnx.BatchNorm:
  """BatchNorm over the (global) batch, momentum 0.9 and eps 1e-5 as in torch/TF ResNets."""
  return nnx.BatchNorm(
      features, momentum=0.9, epsilon=1e-5, use_bias=use_bias, rngs=rngs,
      scale_init=partitioned(nnx.initializers.ones, 'mlp'),
      bias_init=partitioned(nnx.initializers.zeros, 'mlp'))


class ProjectionMLP(nnx.Module):
  """SimCLR's non-linear projection head g(.) (model_util.projection_head).

  `num_layers` linear layers without bias, each followed by BatchNorm; the
  hidden ones by ReLU too. The last BatchNorm has no offset (`center=False`
  in the SimCLR code). Kernels start from N(0, 0.01^2), as there.
  """

  def __init__(self, in_features: int, hidden: int, out_features: int, *, num_layers: int = 2,
               dtype=jnp.float32, rngs: nnx.Rngs):
    dims = [in_features] + [hidden] * (num_layers - 1) + [out_features]
    self.linears = nnx.List([
        nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, rngs=rngs,
                   kernel_init=partitioned(nnx.initializers.normal(0.01), 'embed', 'mlp'))
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)])
    self.norms = nnx.List([batch_norm(d, use_bias=i < num_layers - 1, rngs=rngs)
                           for i, d in enumerate(dims[1:])])

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """(B, in_features) -> (B, out_features)."""
    for i, (linear, norm) in enumerate(zip(self.linears, self.norms, strict=True)):
      x = norm(linear(x), use_running_average=not train)
      if i < len(self.linears) - 1:
        x = jax.nn.relu(x)
    return x


class LinearProbe(nnx.Module):
  """A linear classifier on stop-gradient features, trained alongside pretraining.

  The online probe of SimCLR (`head_supervised`) and solo-learn: it watches
  the representation learn without steering it. Kernel N(0, 0.01^2), zero bias.
  """

  def __init__(self, in_features: int, num_classes: int, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(in_features, num_classes, rngs=rngs,
                             kernel_init=partitioned(nnx.initializers.normal(0.01), 'embed', None),
                             bias_init=partitioned(nnx.initializers.zeros, None))

  def __call__(self, features: jax.Array) -> jax.Array:
    """(B, D) features -> (B, num_classes) logits; no gradient reaches the features."""
    return self.linear(jax.lax.stop_gradient(features).astype(jnp.float32))


def probe_loss_and_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy and top-1 accuracy over examples with a label (>= 0)."""
  has_label = labels >= 0
  valid = has_label.astype(jnp.float32)
  # where= zeroes the unlabelled rows; their label is replaced so no index is out of range.
  per_example = optax.losses.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.where(has_label, labels, 0), where=has_label)
  count = jnp.maximum(valid.sum(), 1.0)
  accuracy = ((logits.argmax(-1) == labels) * valid).sum() / count
  return (per_example * valid).sum() / count, accuracy


class WeightNormLinear(nnx.Module):
  """Bias-free linear layer with weight normalisation (Salimans & Kingma 2016).

  torch.nn.utils.weight_norm(Linear(in, out, bias=False)) as DINO's head uses
  it: w = g * v / |v|, each output unit's weight vector normalised over the
  inputs. With `norm_fixed` (DINO's norm_last_layer=True) g is the constant 1,
  not a parameter: each output is a cosine similarity of the input with v.
  Otherwise g is a parameter of shape (1, out) that starts at 1 (torch's
  weight_g is (out, 1), also 2-D, so weight decay treats it alike). v starts
  from torch's default Linear init, U(-1/sqrt(in), 1/sqrt(in)): DINOHead
  creates the last layer after applying its trunc-normal init to the MLP.
  """

  def __init__(self, in_features: int, out_features: int, *, norm_fixed: bool = True,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.kernel = nnx.Param(partitioned(torch_default_uniform(in_features), 'embed', 'vocab')(
        rngs.params(), (in_features, out_features)))
    self.scale = None if norm_fixed else nnx.Param(
        partitioned(nnx.initializers.ones, None, 'vocab')(rngs.params(), (1, out_features)))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, in) -> (B, out) in float32."""
    v = self.kernel[...].astype(jnp.float32)
    weight = v / jnp.linalg.norm(v, axis=0, keepdims=True)  # (in, out), unit columns
    if self.scale is not None:
      weight = weight * self.scale[...]
    return (x.astype(self.dtype) @ weight.astype(self.dtype)).astype(jnp.float32)


class DINOHead(nnx.Module):
  """DINO's projection head (vision_transformer.py, DINOHead).

  `num_layers` linears (hidden width `hidden_dim`, GELU after each but the
  last, optional BatchNorm before the GELU) down to `bottleneck_dim`, an L2
  normalisation, then the weight-normalised `last_layer` to `out_dim`
  logits. The MLP's kernels start from a truncated normal with std 0.02 and
  its biases at 0, as DINOHead._init_weights (torch's bounds: `torch_trunc_normal`).
  """

  def __init__(self, in_features: int, out_dim: int, *, hidden_dim: int = 2048,
               bottleneck_dim: int = 256, num_layers: int = 3, use_bn: bool = False,
               norm_last_layer: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    num_layers = max(num_layers, 1)
    dims = [in_features] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
    self.linears = nnx.List([
        nnx.Linear(d_in, d_out, dtype=dtype, rngs=rngs,
                   kernel_init=partitioned(torch_trunc_normal(0.02), 'embed', 'mlp'),
                   bias_init=partitioned(nnx.initializers.zeros, 'mlp'))
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True)])
    self.norms = nnx.List([batch_norm(hidden_dim, rngs=rngs) for _ in range(num_layers - 1)]
                          if use_bn else [])
    self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm_fixed=norm_last_layer,
                                       dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = True) -> jax.Array:
    """(B, in_features) -> (B, out_dim) float32 logits."""
    for i, linear in enumerate(self.linears):
      x = linear(x)
      if i < len(self.linears) - 1:
        if self.norms:
          x = self.norms[i](x, use_running_average=not train)
        x = jax.nn.gelu(x, approximate=False)
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
    return self.last_layer(x)
