"""Heads that sit on an encoder's pooled features: projection MLPs and linear probes."""

import jax
import jax.numpy as jnp
from flax import nnx

from ssl_jax.models.vit import partitioned


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
  valid = (labels >= 0).astype(jnp.float32)
  safe_labels = jnp.maximum(labels, 0)
  per_example = -jnp.take_along_axis(jax.nn.log_softmax(logits), safe_labels[:, None], 1)[:, 0]
  count = jnp.maximum(valid.sum(), 1.0)
  accuracy = ((logits.argmax(-1) == labels) * valid).sum() / count
  return (per_example * valid).sum() / count, accuracy
