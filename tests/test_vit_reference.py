"""Our ViT against a float64 NumPy recomputation of the MAE/timm architecture (tests/numpy_vit.py).

Every parameter is drawn at random (zero biases and unit norm scales, as at
init, could hide a bias or scale applied wrongly) and read back out of the
NNX module; the NumPy side never calls our code. float32 against float64
agrees to 2-4e-7 of the output's scale (max abs error / max abs value);
the tolerance is 1e-5, and `test_reference_deviations_are_caught` shows
that the smallest deviations the reference guards against (LayerNorm eps
1e-5 instead of 1e-6, tanh GELU, rows and columns of the sin-cos grid
swapped, one weight moved by 1e-3) all exceed it. LayerNorm's eps only
shows on inputs of small variance, hence the Block test at scale 1e-3.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssl_jax.models.transformer import Attention, Block
from ssl_jax.models.vit import ViT
from tests import numpy_vit as ref

WIDTH, HEADS, MLP_DIM, DEPTH, PATCH, CHANNELS = 32, 4, 64, 2, 4, 3
REL_TOL = 1e-5


def max_error(actual, expected) -> float:
  """Largest absolute difference, relative to the largest |expected|."""
  expected = np.asarray(expected, np.float64)
  return float(np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max())


def assert_close(actual, expected, rel=REL_TOL):
  """max |actual - expected| <= rel * max |expected| (shapes equal)."""
  assert np.shape(actual) == np.shape(expected), (np.shape(actual), np.shape(expected))
  error = max_error(actual, expected)
  assert error <= rel, f'relative error {error:.2e} > {rel:.0e}'


def random_inputs(shape, seed=0, scale=1.0):
  """float32 N(0, scale^2) inputs, and the same values as float64 for the reference."""
  x = (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)
  return jnp.asarray(x), ref.to_numpy(x)


def build(module_class, seed=0, **kwargs):
  """A module with random parameters (see ref.build_with_random_params)."""
  return ref.build_with_random_params(lambda: module_class(**kwargs, rngs=nnx.Rngs(0)), seed)


def small_vit(posemb, image_size=None):
  """Width 32, 4 heads, 2 blocks, patch 4, 3 channels."""
  return build(ViT, patch_size=PATCH, channels=CHANNELS, width=WIDTH, depth=DEPTH,
               num_heads=HEADS, mlp_dim=MLP_DIM, posemb=posemb, image_size=image_size)


# sin-cos: a non-square grid (2 x 3 patches), so a swap of rows and columns shows.
# learned: the native grid of image_size (3 x 3 patches), no interpolation.
VIT_CASES = {'sincos': dict(posemb='sincos', images=(2, 8, 12, CHANNELS)),
             'learned': dict(posemb='learned', image_size=12, images=(2, 12, 12, CHANNELS))}


def test_attention_matches_numpy():
  attn = build(Attention, width=WIDTH, num_heads=HEADS, dtype=jnp.float32)
  x, x64 = random_inputs((2, 5, WIDTH))
  out, weights = attn(x)
  ref_out, ref_weights = ref.attention(x64, ref.attention_weights(attn))
  assert_close(out, ref_out)
  assert_close(weights, ref_weights)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)


# Inputs of scale 1e-3 have variance 1e-6 at the first LayerNorm, where its
# eps (1e-6, not torch's default 1e-5) changes the output by half.
@pytest.mark.parametrize('scale', [1.0, 1e-3])
def test_block_matches_numpy(scale):
  block = build(Block, width=WIDTH, num_heads=HEADS, mlp_dim=MLP_DIM, dtype=jnp.float32)
  x, x64 = random_inputs((2, 5, WIDTH), seed=1, scale=scale)
  out, weights = block(x)
  ref_out, ref_weights = ref.block(x64, ref.block_weights(block))
  assert_close(out, ref_out)
  assert_close(weights, ref_weights)


@pytest.mark.parametrize('case', VIT_CASES)
def test_vit_matches_numpy(case):
  options = dict(VIT_CASES[case])
  images, images64 = random_inputs(options.pop('images'), seed=2)
  model = small_vit(**options)
  out = model(images)
  expected = ref.vit(images64, ref.vit_weights(model))
  for key in ('tokens', 'cls', 'patch_mean', 'attention'):
    assert out[key].dtype == jnp.float32, key
    assert_close(out[key], expected[key])


def perturbed_weights(weights):
  """The ViT weights with one query weight of the first block moved by 1e-3."""
  weights['encoder']['blocks'][0]['attn']['qkv']['kernel'][3, 5] += 1e-3
  return weights


DEVIATIONS = {
    'layer_norm_eps_1e-5': dict(eps=1e-5),
    'tanh_gelu': dict(approximate_gelu=True),
    'posemb_rows_and_columns_swapped': dict(swap_posemb_axes=True),
    'one_weight_moved_by_1e-3': dict(weights=perturbed_weights),
}


@pytest.mark.parametrize('deviation', DEVIATIONS)
def test_reference_deviations_are_caught(deviation):
  """Each deviation from the reference moves the output by more than REL_TOL."""
  options = dict(DEVIATIONS[deviation])
  change_weights = options.pop('weights', lambda w: w)
  images, images64 = random_inputs(VIT_CASES['sincos']['images'], seed=2)
  model = small_vit('sincos')
  tokens = model(images)['tokens']
  assert_close(tokens, ref.vit(images64, ref.vit_weights(model))['tokens'])
  deviated = ref.vit(images64, change_weights(ref.vit_weights(model)), **options)['tokens']
  assert max_error(tokens, deviated) > 3 * REL_TOL, max_error(tokens, deviated)
