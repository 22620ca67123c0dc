"""MAE pieces: masking, position embeddings, model shapes, pictures, features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import mae_vit
from ssl_jax import methods, train
from ssl_jax.methods.mae import random_masking
from ssl_jax.models.vit import posemb_sincos_2d


def numpy_mae_posemb(embed_dim: int, grid_size: int) -> np.ndarray:
  """MAE's util/pos_embed.py get_2d_sincos_pos_embed, re-typed from the paper code."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)

  def one_d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum('m,d->md', pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def test_posemb_matches_mae_reference():
  np.testing.assert_allclose(posemb_sincos_2d(4, 4, 32), numpy_mae_posemb(32, 4), atol=1e-6)


def test_random_masking_keeps_exactly_the_unmasked_tokens():
  tokens = jnp.arange(2 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 3)
  kept, mask, ids_restore = random_masking(tokens, jax.random.key(0), 0.75)
  assert kept.shape == (2, 4, 3)
  np.testing.assert_array_equal(mask.sum(axis=1), [12, 12])
  for b in range(2):
    visible = np.asarray(tokens[b])[np.asarray(mask[b]) == 0]
    np.testing.assert_array_equal(np.sort(np.asarray(kept[b]), axis=0), np.sort(visible, axis=0))
    assert sorted(np.asarray(ids_restore[b]).tolist()) == list(range(16))
  # Different samples get different masks; the same key gives the same mask.
  assert not np.array_equal(mask[0], mask[1])
  np.testing.assert_array_equal(random_masking(tokens, jax.random.key(0), 0.75)[1], mask)


def test_mask_ratio_is_uniform_over_positions():
  tokens = jnp.zeros((4000, 16, 1))
  _, mask, _ = random_masking(tokens, jax.random.key(1), 0.75)
  per_position = np.asarray(mask).mean(axis=0)
  np.testing.assert_allclose(per_position, 0.75, atol=0.03)


@pytest.fixture(scope='module')
def local_mae():
  config = train.resolve_config(mae_vit.get_config('local'), 1437)
  method = methods.create(config)
  with nnx.use_eager_sharding(False):
    model = method.build(nnx.Rngs(0))
  return config, method, model


def test_model_shapes_and_loss(local_mae):
  config, method, model = local_mae
  images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 1), np.uint8)
  pred, mask = model(jnp.asarray(images, jnp.float32), jax.random.key(0), 0.75)
  assert pred.shape == (4, 16, 16) and mask.shape == (4, 16)
  loss, metrics = method.loss_fn(model, {'image': jnp.asarray(images)}, jax.random.key(0), 0)
  assert np.isfinite(loss) and float(metrics['mask_fraction']) == 0.75
  features = method.features(method.encoder(model), jnp.asarray(images))
  assert features.shape == (4, config.model.width)


def test_reconstruction_picture(local_mae):
  _, method, model = local_mae
  images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 1), np.uint8)
  picture = method.render(method.visualize(model, {'image': jnp.asarray(images)},
                                           jax.random.key(0)))
  # Three rows (original, masked, reconstruction) of 8 images, enlarged to 64 px.
  assert picture.dtype == np.uint8 and picture.shape == (3 * 66 + 2, 8 * 66 + 2, 3)
  # The first row is the original image, pixel for pixel (4x nearest-neighbour).
  np.testing.assert_array_equal(picture[2:66:4, 2:66:4, 0], images[0, :, :, 0])


def test_encoder_starts_where_training_starts(local_mae):
  """The random-init baseline encoder equals the encoder training began from."""
  _, method, model = local_mae
  with nnx.use_eager_sharding(False):
    fresh = method.build_encoder(nnx.Rngs(0))
  for a, b in zip(jax.tree.leaves(nnx.state(fresh)),
                  jax.tree.leaves(nnx.state(method.encoder(model))), strict=True):
    np.testing.assert_array_equal(a, b)
