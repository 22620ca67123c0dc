"""`model.remat` policies change memory, never gradients: ViT, GPT and ResNet against no remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from ssl_jax import sharding
from ssl_jax.errors import ConfigError
from ssl_jax.models.lm import TransformerLM, gpt2_config
from ssl_jax.models.remat import POLICIES, policy_name
from ssl_jax.models.resnet import ResNet
from ssl_jax.models.vit import ViT

SETTINGS = ('full', 'dots', 'dots_saveable', 'nothing_saveable', True)


def vit_loss(remat):
  """(model, loss of the model): a 2-block ViT on 8x8 images."""
  model = ViT(patch_size=4, channels=3, width=16, depth=2, num_heads=2, mlp_dim=32,
              remat=remat, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  # A random read-out: the squares of LayerNormed tokens would sum to a constant.
  readout = jax.random.normal(jax.random.key(2), (2, 5, 16))
  return model, lambda m: jnp.sum(m(images)['tokens'] * readout)


def gpt_loss(remat):
  """(model, loss of the model): a 2-block GPT on 8 tokens."""
  model = TransformerLM(gpt2_config(vocab_size=32, max_len=8, width=16, depth=2, num_heads=2,
                                    mlp_dim=32, remat=remat), rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
  return model, lambda m: jnp.sum(jax.nn.log_softmax(m(tokens)['logits']) ** 2)


def resnet_loss(remat):
  """(model, loss of the model): a 2-block ResNet-18 in train mode (batch statistics)."""
  model = ResNet(18, stem='cifar', width_multiplier=0.25, stage_sizes=(1, 1), remat=remat,
                 rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  return model, lambda m: jnp.sum(m(images, train=True)['pooled'] ** 2)


def on_one_device(build, remat):
  """`build(remat)` inside a one-device mesh (the models' parameters carry logical axes)."""
  mesh = sharding.make_mesh(sharding.mesh_config(1, 1, 1), jax.devices()[:1])
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    return build(remat)


def grads_of(build, remat):
  """Parameter gradients (a flat dict) and updated non-parameter state of `build(remat)`."""
  model, loss_of = on_one_device(build, remat)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    merged = nnx.merge(graphdef, params, rest, copy=True)
    return loss_of(merged), nnx.state(merged, nnx.Not(nnx.Param))

  grads, new_rest = jax.jit(jax.grad(loss, has_aux=True))(params)
  flat = {'/'.join(map(str, path)): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(grads)}
  return flat, jax.tree.leaves(new_rest)


@pytest.mark.parametrize('build', [vit_loss, gpt_loss, resnet_loss],
                         ids=['vit', 'gpt', 'resnet'])
def test_every_policy_gives_the_gradients_of_no_remat(build):
  want, want_rest = grads_of(build, 'none')
  assert any(np.abs(g).max() > 0 for g in want.values())  # A real gradient, not zeros.
  for remat in SETTINGS:
    got, got_rest = grads_of(build, remat)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f'{remat}: {key}')
    for new, old in zip(got_rest, want_rest, strict=True):  # BatchNorm statistics too.
      np.testing.assert_allclose(np.asarray(new), np.asarray(old), rtol=1e-5, atol=1e-6)


def test_policy_names():
  assert policy_name(False) is None and policy_name('none') is None
  assert policy_name('False') is None  # A string key set from the command line.
  assert policy_name(True) == policy_name('True') == 'full'
  assert policy_name('dots') == 'dots' and set(POLICIES) >= {'full', 'dots', 'dots_saveable'}
  with pytest.raises(ConfigError, match="remat='everything'"):
    policy_name('everything')


def test_a_policy_really_saves_less(capsys):
  """'full' keeps fewer residuals than 'dots_saveable', which keeps fewer than no remat."""
  def saved(remat):
    model, loss_of = on_one_device(gpt_loss, remat)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    capsys.readouterr()
    print_saved_residuals(lambda p: loss_of(nnx.merge(graphdef, p, rest, copy=True)), params)
    return len(capsys.readouterr().out.splitlines())  # One line per saved array.
  assert saved('full') < saved('dots_saveable') < saved('none')
