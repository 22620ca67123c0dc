"""DINO's building blocks: the head, learned ViT positions and the multi-crop colour ops."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssl_jax.data import device_augment as da
from ssl_jax.models.heads import DINOHead
from ssl_jax.models.vit import ViT, bicubic_matrix, interpolate_posemb

# torch.nn.functional.interpolate(mode='bicubic', scale_factor=(g + 0.1) / n) applied to
# the basis vectors (torch 2.13, float64): the interpolation matrices DINO's
# interpolate_pos_encoding uses, (g, n).
TORCH_BICUBIC = {
    (4, 2): [[0.55351744, 0.53053463, -0.08405207, 0.0],
             [0.0, -0.11069606, 0.76995262, 0.34074344]],
    (3, 7): [[1.10955264, -0.10955264, 0.0],
             [0.88741824, 0.12421253, -0.01163077],
             [0.43670913, 0.6662799, -0.10298903],
             [0.01617511, 0.99900752, -0.01518263],
             [-0.10787205, 0.71830837, 0.38956368],
             [-0.01915412, 0.17171474, 0.84743938],
             [0.0, -0.10496194, 1.10496194]],
}


@pytest.fixture(autouse=True)
def no_eager_sharding():
  """Modules built outside a mesh (as test_mae.py does)."""
  with nnx.use_eager_sharding(False):
    yield


def _gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _head_numpy(head: DINOHead, x: np.ndarray) -> np.ndarray:
  """DINOHead.forward in NumPy float64 from the module's weights."""
  x = x.astype(np.float64)
  for i, linear in enumerate(head.linears):
    x = x @ np.asarray(linear.kernel[...], np.float64) + np.asarray(linear.bias[...])
    if i < len(head.linears) - 1:
      x = _gelu(x)
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  v = np.asarray(head.last_layer.kernel[...], np.float64)
  return x @ (v / np.linalg.norm(v, axis=0, keepdims=True))


def test_dino_head_matches_numpy_and_has_unit_norm_last_layer():
  head = DINOHead(12, 40, hidden_dim=32, bottleneck_dim=8, rngs=nnx.Rngs(0))
  assert [tuple(linear.kernel.shape) for linear in head.linears] == [(12, 32), (32, 32), (32, 8)]
  assert head.last_layer.scale is None  # norm_last_layer: g is the constant 1.
  x = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
  got = np.asarray(head(x))
  np.testing.assert_allclose(got, _head_numpy(head, x), rtol=1e-4, atol=1e-5)
  # Each output is a cosine similarity: within [-1, 1], unchanged by rescaling v.
  assert np.abs(got).max() <= 1.0 + 1e-5
  head.last_layer.kernel[...] = head.last_layer.kernel[...] * 7.0
  np.testing.assert_allclose(np.asarray(head(x)), got, rtol=1e-5, atol=1e-6)
  # Initial weights: trunc-normal std 0.02 in the MLP, torch's Linear default in v.
  kernel = np.asarray(head.linears[1].kernel[...])
  assert abs(kernel.std() - 0.02) < 0.002  # torch's trunc_normal_: std 0.02, cut at +-2.
  assert np.abs(np.asarray(head.last_layer.kernel[...])).max() <= 7.0 / math.sqrt(8)


def test_dino_head_trainable_norm_starts_at_one():
  head = DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False,
                  rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(np.asarray(head.last_layer.scale[...]), np.ones((1, 10)))
  head.last_layer.scale[...] = jnp.full((1, 10), 2.0)
  x = np.ones((2, 6), np.float32)
  np.testing.assert_allclose(np.asarray(head(x)), 2 * _head_numpy(head, x), rtol=1e-4)


@pytest.mark.parametrize('sizes', list(TORCH_BICUBIC))
def test_bicubic_matrix_matches_torch(sizes):
  n, g = sizes
  np.testing.assert_allclose(bicubic_matrix(n, g, (g + 0.1) / n), TORCH_BICUBIC[sizes],
                             atol=1e-7)


def test_interpolated_positions_keep_cls_and_same_grid():
  rng = np.random.default_rng(2)
  posemb = jnp.asarray(rng.normal(size=(1, 1 + 16, 6)), jnp.float32)
  assert interpolate_posemb(posemb, 4, 4) is posemb  # DINO returns pos_embed itself.
  small = np.asarray(interpolate_posemb(posemb, 2, 2))
  assert small.shape == (1, 5, 6)
  np.testing.assert_array_equal(small[0, 0], posemb[0, 0])
  # Separable: position (i, j) = sum_hw R[i, h] C[j, w] P[h, w].
  m = np.asarray(TORCH_BICUBIC[(4, 2)])
  grid = np.asarray(posemb)[0, 1:].reshape(4, 4, 6)
  want = np.einsum('ih,jw,hwd->ijd', m, m, grid).reshape(4, 6)
  np.testing.assert_allclose(small[0, 1:], want, rtol=1e-5, atol=1e-6)


def test_learned_position_vit_params_and_local_crops():
  vit = ViT(patch_size=4, channels=1, width=16, depth=1, num_heads=2, mlp_dim=32,
            posemb='learned', image_size=16, rngs=nnx.Rngs(0))
  assert vit.pos_embed.shape == (1, 17, 16)
  assert abs(float(jnp.std(vit.pos_embed[...])) - 0.02) < 0.006
  images = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 1)), jnp.float32)
  out = vit(images)  # A local crop: 2x2 grid, positions interpolated from 4x4.
  assert out['tokens'].shape == (2, 5, 16) and out['attention'].shape == (2, 2, 5, 5)
  patches = vit.patch_embed(images).reshape(2, 4, 16)
  want = patches + interpolate_posemb(vit.pos_embed[...], 2, 2)[:, 1:]
  np.testing.assert_allclose(np.asarray(vit.patch_tokens(images)), np.asarray(want), rtol=1e-6)
  # The sin-cos default has no position parameter (MAE's structure is unchanged).
  plain = ViT(patch_size=4, channels=1, width=16, depth=1, num_heads=2, mlp_dim=32,
              rngs=nnx.Rngs(0))
  assert not hasattr(plain, 'pos_embed')
  assert set(nnx.to_pure_dict(nnx.state(vit, nnx.Param))) == (
      set(nnx.to_pure_dict(nnx.state(plain, nnx.Param))) | {'pos_embed'})
  with pytest.raises(ValueError, match='image_size'):
    ViT(patch_size=4, channels=1, width=16, depth=1, num_heads=2, mlp_dim=32,
        posemb='learned', rngs=nnx.Rngs(0))


COLOUR = dict(blur_kernel_size=5, blur_sigma=(0.1, 1.0))


def test_colour_of_host_crops_shapes_distinct_views_and_reproducible():
  rng = np.random.default_rng(4)
  # Each image's crops are all the same pixels: only the colour ops tell its views apart.
  image = rng.integers(0, 256, (4, 1, 16, 16, 3), np.uint8)
  global_crops = np.repeat(image, 2, axis=1)  # (4, 2, 16, 16, 3)
  local_crops = np.repeat(image[:, :, 4:12, 4:12], 3, axis=1)  # (4, 3, 8, 8, 3)
  colour = jax.jit(lambda key: da.dino_colour(key, global_crops, local_crops, **COLOUR))
  global_views, local_views = colour(jax.random.key(0))
  assert global_views.shape == (4, 2, 16, 16, 3) and local_views.shape == (4, 3, 8, 8, 3)
  for views, crops in ((global_views, global_crops), (local_views, local_crops)):
    views = np.asarray(views)
    assert views.min() >= 0.0 and views.max() <= 1.0
    # One key per view and example: an image's views are coloured differently. (Two
    # views both left untouched, p <= 0.2 x 0.8 x 0.5 each, would be equal.)
    for a, b in itertools.combinations(range(views.shape[1]), 2):
      assert (np.abs(views[:, a] - views[:, b]).max(axis=(1, 2, 3)) > 1e-3).mean() >= 0.75
    changed = np.abs(views - crops / 255).max(axis=(2, 3, 4)) > 1e-3  # (B, V)
    assert changed.mean() > 0.6  # Colour jitter alone has p 0.8.
  again = colour(jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(global_views))
  np.testing.assert_array_equal(np.asarray(again[1]), np.asarray(local_views))
  other = colour(jax.random.key(1))
  assert np.abs(np.asarray(other[1]) - np.asarray(local_views)).mean() > 1e-2


def test_colour_of_global_views_follows_their_probabilities():
  """View 1 is always blurred, never solarized; view 2 solarized with p 0.2."""
  images = np.full((256, 16, 16, 1), 200, np.uint8)  # Flat bright images: blur is a no-op.
  images[:, :8] = 30  # A horizontal edge that blur softens.
  plain = dict(COLOUR, blur_sigma=(1.0, 2.0),  # Always visible at the edge.
               brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, jitter_prob=0.0,
               grayscale_prob=0.0)
  crops = np.stack([images, images], axis=1)  # (256, 2, 16, 16, 1), as the host cut them.
  global_views, local_views = jax.jit(
      lambda key: da.dino_colour(key, crops, None, **plain))(jax.random.key(5))
  assert local_views is None
  original = images / 255.0
  first, second = np.asarray(global_views).swapaxes(0, 1)
  blurred = np.abs(first - original).max(axis=(1, 2, 3)) > 1e-3
  assert blurred.all()
  solarized = (second[:, 12, 0, 0] < 0.5)  # The bright half, inverted.
  assert 0.1 < solarized.mean() < 0.3
  assert not (first[:, 12, 0, 0] < 0.5).any()
  kept = second[~solarized]
  second_blurred = np.abs(kept - original[:len(kept)]).max(axis=(1, 2, 3)) > 1e-3
  assert 0.02 < second_blurred.mean() < 0.2  # p = 0.1.
