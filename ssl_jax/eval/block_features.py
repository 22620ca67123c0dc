"""DINO's linear-probe feature: the [CLS] tokens of the last n ViT blocks, concatenated.

dino eval_linear.py lines 166-169: `get_intermediate_layers(x, n)` returns
the outputs of the last n blocks, each through the final LayerNorm
(vision_transformer.py `get_intermediate_layers`), and the probe reads
`cat([x[:, 0] for x in those])`, plus the mean of the last block's patch
tokens when `avgpool_patchtokens`. n = 4 without avgpool is the ViT-S
setting (eval_linear.py line 256); n = 1 with avgpool for ViT-B.
"""

import jax
import jax.numpy as jnp

from ssl_jax.data.normalize import normalize
from ssl_jax.errors import ConfigError
from ssl_jax.models.vit import ViT


def last_blocks_features(encoder: ViT, images: jax.Array, *, mean, std, n_last_blocks: int,
                         avgpool_patchtokens: bool) -> jax.Array:
  """(B, H, W, C) uint8 -> (B, D * (n + avgpool)) float32, as DINO's linear probe reads them."""
  if not isinstance(encoder, ViT):
    raise ConfigError(f'n_last_blocks needs a ViT encoder, not {type(encoder).__name__}: '
                      'set --config.eval.linear_probe.n_last_blocks=0 (the method\'s feature)')
  depth = len(encoder.encoder.blocks)
  if not 1 <= n_last_blocks <= depth:
    raise ConfigError(f'n_last_blocks={n_last_blocks}: the ViT has {depth} blocks')
  tokens = encoder.patch_tokens(normalize(images, mean, std))  # (B, L, D)
  cls = encoder.cls_token[...]
  if encoder.posemb == 'learned':
    cls = cls + encoder.pos_embed[:, :1]
  cls = jnp.broadcast_to(cls.astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
  x = jnp.concatenate([cls, tokens], axis=1)  # (B, 1+L, D), as ViT.encode
  outputs = []
  for i, block in enumerate(encoder.encoder.blocks):
    x, _ = block(x, need_weights=False)
    if i >= depth - n_last_blocks:
      outputs.append(encoder.encoder.norm(x))
  features = [out[:, 0] for out in outputs]
  if avgpool_patchtokens:
    features.append(outputs[-1][:, 1:].mean(axis=1))
  return jnp.concatenate(features, axis=-1).astype(jnp.float32)
