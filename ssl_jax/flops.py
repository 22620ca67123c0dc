"""Analytic training FLOPs of the models, the numerator of MFU.

The count is the convention of PaLM (Chowdhery et al. 2022, appendix B) and
nanoGPT's `estimate_mfu`: every matmul weight a token meets costs 2 FLOPs
forward and 4 backward (6 per token per weight), plus attention's two
(T x T) products, 12 x depth x T^2 x width per sequence. Elementwise work
(norms, softmax, GELU, the optimizer update) is left out, so XLA's own count
of a compiled step (`ssl_jax.bench`) is a little larger.
"""

import ml_collections


def transformer_train_flops(tokens: int, width: int, mlp_dim: int, depth: int) -> float:
  """Forward + backward FLOPs of `depth` pre-norm blocks over one sequence of `tokens`."""
  weights = depth * (4 * width * width + 2 * width * mlp_dim)  # qkv + proj, MLP in + out.
  return float(6 * weights * tokens + 12 * depth * tokens ** 2 * width)


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
