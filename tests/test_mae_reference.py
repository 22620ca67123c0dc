"""MAEModel (masking, encoder, decoder with its unshuffle) against facebookresearch/mae in NumPy.

The reference is `MaskedAutoencoderViT.forward_encoder` / `forward_decoder`
of models_mae.py (facebookresearch/mae at efb2a80, lines 123-196), re-typed
in float64 NumPy in tests/numpy_vit.py `mae_forward`: random_masking by
argsort of the noise (keep the `int(L * (1 - mask_ratio))` smallest),
encoder on [CLS] + kept tokens, decoder_embed, mask tokens appended and
unshuffled with ids_restore, decoder sin-cos positions (zero on [CLS]),
decoder blocks, decoder_norm, decoder_pred, [CLS] dropped.

How the noise enters ours: `MAEModel.__call__(images, rng, mask_ratio)`
draws it inside `random_masking` as `jax.random.uniform(rng, (B, L))`, the
counterpart of the reference's `torch.rand(N, L)`. The test draws the same
array from the same key and hands it to the reference, so everything after
the draw (the argsort, which tokens are kept, the mask, the unshuffle) is
recomputed independently. If the draw itself changes, `mask` stops matching
and this test says so first.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssl_jax.methods.mae import MAEModel
from ssl_jax.models.vit import ViT
from tests import numpy_vit as ref
from tests.test_vit_reference import assert_close

PATCH, CHANNELS = 4, 3


def small_mae(seed=0):
  """Encoder width 32 / 4 heads / 2 blocks; decoder width 16 / 2 heads / 2 blocks; randomised."""
  def constructor():
    rngs = nnx.Rngs(0)
    encoder = ViT(patch_size=PATCH, channels=CHANNELS, width=32, depth=2, num_heads=4,
                  mlp_dim=64, rngs=rngs)
    return MAEModel(encoder, channels=CHANNELS, decoder_width=16, decoder_depth=2,
                    decoder_heads=2, decoder_mlp_dim=32, dtype=jnp.float32, remat=False,
                    rngs=rngs)
  return ref.build_with_random_params(constructor, seed)


# A square grid as in the paper code, and a 3 x 4 grid (the reference is
# square-only; ours takes any grid, so rows and columns must not mix).
@pytest.mark.parametrize('image_shape,mask_ratio', [((16, 16), 0.75), ((12, 16), 0.6)])
def test_mae_forward_matches_reference(image_shape, mask_ratio):
  model = small_mae()
  images = np.random.default_rng(3).normal(size=(3, *image_shape, CHANNELS)).astype(np.float32)
  rng = jax.random.key(7)
  # Jitted: op-by-op dispatch of two transformers is slow on CPU.
  forward = nnx.jit(lambda m, x, key: m(x, key, mask_ratio))
  pred, mask = forward(model, jnp.asarray(images), rng)

  length = (image_shape[0] // PATCH) * (image_shape[1] // PATCH)
  noise = np.asarray(jax.random.uniform(rng, (images.shape[0], length)))  # as random_masking
  ref_pred, ref_mask = ref.mae_forward(ref.to_numpy(images), noise, mask_ratio,
                                       ref.mae_weights(model))
  assert pred.dtype == jnp.float32 and mask.shape == (images.shape[0], length)
  np.testing.assert_array_equal(np.asarray(mask), ref_mask)
  np.testing.assert_array_equal(ref_mask.sum(1), length - int(length * (1 - mask_ratio)))
  assert_close(pred, ref_pred)
