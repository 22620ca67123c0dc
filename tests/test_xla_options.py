"""XLA:CPU options of the train step: when they apply, that they reach XLA, same numbers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssl_jax import sharding, xla_options
from ssl_jax.models import resnet
from ssl_jax.models.resnet import ResNet
from tests import test_sharded_step


@pytest.fixture
def no_user_flag(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')


def test_convolutions_leave_ynnpack_on_the_measured_cpu_stack_only(no_user_flag, monkeypatch):
  assert xla_options.step_options('cpu') == {
      'xla_cpu_experimental_ynn_fusion_type':
          'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE'}
  assert xla_options.step_options('gpu') is None
  assert xla_options.step_options('tpu') is None
  monkeypatch.setattr(xla_options, '_jaxlib_version', lambda: '0.11.0')
  assert xla_options.step_options('cpu') is None


def test_the_users_xla_flags_win(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=dot,reduce,'
                     'individual_convolution')
  assert xla_options.step_options('cpu') is None


def test_the_train_step_compiles_with_the_options(monkeypatch):
  # A value XLA rejects proves the step hands its options to the compiler.
  monkeypatch.setattr(xla_options, 'step_options', lambda platform: {
      xla_options.YNN_FUSION_TYPES: 'LIBRARY_FUSION_TYPE_NO_SUCH_TYPE'})
  config = test_sharded_step.tiny_config('mae', 'sgd', dict(data=1, fsdp=1, tensor=1))
  with pytest.raises(Exception, match='NO_SUCH_TYPE'):
    test_sharded_step.run_steps(config, jax.devices()[:1], num_steps=1)


def resnet_loss():
  """(loss of a ResNet-18 w16's params on 8 random 16 px images, those params), on one CPU."""
  mesh = sharding.make_mesh(sharding.mesh_config(1, 1, 1), jax.devices()[:1])
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    model = ResNet(18, stem='cifar', width_multiplier=0.25, channels=3, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))

  def loss(params):
    out = nnx.merge(graphdef, params, rest, copy=True)(images, train=True)
    return jnp.mean(out['pooled'] ** 2)

  return loss, params


def test_resnet_gradients_are_the_same_without_ynnpack_convolutions(no_user_flag):
  loss, params = resnet_loss()
  options = xla_options.step_options('cpu')
  assert options is not None
  default = jax.jit(jax.value_and_grad(loss))(params)
  without = jax.jit(jax.value_and_grad(loss), compiler_options=options)(params)
  np.testing.assert_allclose(without[0], default[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(without[1]), jax.tree.leaves(default[1]), strict=True):
    # Float rounding of other summation orders: ~3e-6 of the largest entry, here.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5 * float(jnp.abs(b).max()))


def transposes_that_recompute_relu(hlo: str) -> int:
  """How many transposing fusions of compiled HLO text compute a ReLU (`maximum`) inside."""
  bodies = dict(re.findall(r'^(%\S+) \(.*?\n(.*?)^}', hlo, re.M | re.S))
  calls = re.findall(r'%transpose\S*fusion\S* = .*calls=(%[\w.\-]+)', hlo)
  return sum(' maximum(' in bodies[name] for name in calls)


def test_resnet_activations_are_materialized_for_the_kernel_gradients(no_user_flag, monkeypatch):
  """`materialized` changes no number, and keeps XLA from recomputing ReLUs in transposes."""
  loss, params = resnet_loss()
  options = xla_options.step_options('cpu')
  compiled = jax.jit(jax.value_and_grad(loss), compiler_options=options).lower(params).compile()
  kept = compiled(params)
  assert transposes_that_recompute_relu(compiled.as_text()) == 0
  monkeypatch.setattr(resnet, 'materialized', lambda x: x)
  fused = jax.jit(jax.value_and_grad(loss), compiler_options=options).lower(params).compile()
  assert transposes_that_recompute_relu(fused.as_text()) > 0  # What the division prevents.
  same = fused(params)
  assert float(kept[0]) == float(same[0])
  for a, b in zip(jax.tree.leaves(kept[1]), jax.tree.leaves(same[1]), strict=True):
    np.testing.assert_array_equal(a, b)
