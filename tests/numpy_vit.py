"""A float64 NumPy ViT and MAE, written from the papers' reference code, for reference tests.

Nothing here imports ssl_jax: the reference functions take plain dicts of NumPy
weights, read out of our NNX modules by `*_weights` below (the only place
that knows our parameter layout), and recompute what the PyTorch reference
computes:

- timm `vision_transformer.Block` as MAE uses it (models_mae.py lines 39-42:
  `Block(..., qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))`):
  x + attn(LN(x)), then x + mlp(LN(x)); `Attention` is one fused qkv Linear
  (D -> 3D, rows ordered (qkv, head, head_dim)), softmax(q k^T / sqrt(E)),
  heads concatenated, output Linear; `Mlp` is Linear, exact (erf) GELU, Linear.
- timm `PatchEmbed`: a Conv2d with kernel = stride = patch, i.e. a Linear on
  each patch flattened in (row, col, channel) order (NHWC here).
- MAE util/pos_embed.py `get_2d_sincos_pos_embed` (lines 20-67): the first
  half of the channels [sin | cos] of the column index, the second half of
  the row index, frequencies 1 / 10000^(k / (D/4)); no position on [CLS].
- MAE models_mae.py `random_masking`, `forward_encoder`, `forward_decoder`
  (lines 123-196, facebookresearch/mae at efb2a80).

The knobs (`eps`, `gelu`, `swap_posemb_axes`) exist so tests can show that
a deviation from the reference is caught at the tolerance they use.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.special import erf


def to_numpy(array) -> np.ndarray:
  """Any array (JAX or NumPy) as float64 NumPy."""
  return np.asarray(array, np.float64)


# ---------------------------------------------------------------- weights out of our modules


def build_with_random_params(constructor, seed: int, scale: float = 0.2):
  """`constructor()`'s module with every nnx.Param drawn afresh, never run through its initialisers.

  LayerNorm scales are 1 + N(0, scale^2), every other parameter N(0, scale^2):
  zero biases and unit scales (as at init) would hide a bias or a scale that
  is applied wrongly, and skipping the initialisers (abstract build with
  nnx.eval_shape) keeps the test independent of them and ~20x faster on CPU.
  """
  with nnx.use_eager_sharding(False):
    module = nnx.eval_shape(constructor)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param))
  rng = np.random.default_rng(seed)
  values = []
  for path, leaf in leaves:
    is_norm_scale = any(getattr(key, 'key', None) == 'scale' for key in path)
    values.append(jnp.asarray(float(is_norm_scale) + scale * rng.normal(size=leaf.shape),
                              leaf.dtype))
  nnx.update(module, jax.tree.unflatten(treedef, values))
  return module


def layer_norm_weights(norm) -> dict:
  """nnx.LayerNorm -> {'scale', 'bias'}."""
  return {'scale': to_numpy(norm.scale[...]), 'bias': to_numpy(norm.bias[...])}


def linear_weights(linear) -> dict:
  """nnx.Linear -> {'kernel' (in, out), 'bias' (out,)}: torch's weight.T and bias."""
  return {'kernel': to_numpy(linear.kernel[...]), 'bias': to_numpy(linear.bias[...])}


def attention_weights(attn) -> dict:
  """Our Attention -> timm's fused qkv Linear (D, 3D) and proj Linear (D, D), as (in, out)."""
  qkv_kernel = to_numpy(attn.qkv.kernel[...])  # (D, 3, heads, head_dim)
  width, _, num_heads, head_dim = qkv_kernel.shape
  proj_kernel = to_numpy(attn.proj.kernel[...])  # (heads, head_dim, D)
  return {
      'num_heads': num_heads,
      'qkv': {'kernel': qkv_kernel.reshape(width, 3 * num_heads * head_dim),
              'bias': to_numpy(attn.qkv.bias[...]).reshape(-1)},
      'proj': {'kernel': proj_kernel.reshape(num_heads * head_dim, -1),
               'bias': to_numpy(attn.proj.bias[...])},
  }


def block_weights(block) -> dict:
  """Our Block -> norm1, attn, norm2, mlp (fc1, fc2)."""
  return {'norm1': layer_norm_weights(block.norm1), 'attn': attention_weights(block.attn),
          'norm2': layer_norm_weights(block.norm2),
          'mlp': {'fc1': linear_weights(block.mlp.fc1), 'fc2': linear_weights(block.mlp.fc2)}}


def transformer_weights(transformer) -> dict:
  """Our Transformer -> its blocks and final norm."""
  return {'blocks': [block_weights(b) for b in transformer.blocks],
          'norm': layer_norm_weights(transformer.norm)}


def vit_weights(vit) -> dict:
  """Our ViT -> patch embedding as a Linear on flattened patches, cls, positions, encoder."""
  conv = to_numpy(vit.patch_embed.kernel[...])  # (p, p, C, D), HWIO
  patch, _, channels, width = conv.shape
  weights = {
      'patch_size': patch,
      'patch_embed': {'kernel': conv.reshape(patch * patch * channels, width),
                      'bias': to_numpy(vit.patch_embed.bias[...])},
      'cls_token': to_numpy(vit.cls_token[...]).reshape(width),
      'pos_embed': None,  # sin-cos: computed from the grid
      'encoder': transformer_weights(vit.encoder),
  }
  if vit.posemb == 'learned':
    weights['pos_embed'] = to_numpy(vit.pos_embed[...])[0]  # (1 + L, D), [CLS] first
  return weights


def mae_weights(mae) -> dict:
  """Our MAEModel -> encoder, decoder_embed, mask_token, decoder blocks + norm, decoder_pred."""
  return {'encoder': vit_weights(mae.encoder),
          'decoder_embed': linear_weights(mae.decoder_embed),
          'mask_token': to_numpy(mae.mask_token[...]).reshape(-1),
          'decoder': transformer_weights(mae.decoder),
          'decoder_pred': linear_weights(mae.decoder_pred)}


# ---------------------------------------------------------------- the reference computation


def layer_norm(x, w, eps=1e-6):
  """torch.nn.LayerNorm (biased variance)."""
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w['scale'] + w['bias']


def linear(x, w):
  """torch.nn.Linear with weight.T = w['kernel']."""
  return x @ w['kernel'] + w['bias']


def gelu(x, approximate=False):
  """torch.nn.GELU(): exact, 0.5 x (1 + erf(x / sqrt 2)); the tanh form only to show it differs."""
  if approximate:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def softmax(logits):
  """Softmax over the last axis."""
  logits = logits - logits.max(-1, keepdims=True)
  e = np.exp(logits)
  return e / e.sum(-1, keepdims=True)


def attention(x, w):
  """timm Attention.forward: (B, N, D) -> ((B, N, D), weights (B, heads, N, N))."""
  batch, length, width = x.shape
  heads = w['num_heads']
  qkv = linear(x, w['qkv']).reshape(batch, length, 3, heads, width // heads)
  q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # each (B, heads, N, E)
  weights = softmax(q @ k.transpose(0, 1, 3, 2) * (width // heads) ** -0.5)
  out = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
  return linear(out, w['proj']), weights


def block(x, w, eps=1e-6, approximate_gelu=False):
  """timm Block.forward (no drop path at eval): ((B, N, D), attention weights)."""
  attended, weights = attention(layer_norm(x, w['norm1'], eps), w['attn'])
  x = x + attended
  hidden = gelu(linear(layer_norm(x, w['norm2'], eps), w['mlp']['fc1']), approximate_gelu)
  return x + linear(hidden, w['mlp']['fc2']), weights


def transformer(x, w, **options):
  """Blocks then the final norm: (normed (B, N, D), last block's attention weights)."""
  weights = None
  for block_w in w['blocks']:
    x, weights = block(x, block_w, **options)
  return layer_norm(x, w['norm'], options.get('eps', 1e-6)), weights


def sincos_posemb(grid_h, grid_w, width, swap_posemb_axes=False):
  """(grid_h * grid_w, D) positions of MAE's get_2d_sincos_pos_embed, extended to h != w."""
  rows, cols = np.divmod(np.arange(grid_h * grid_w, dtype=np.float64), grid_w)  # row-major
  if swap_posemb_axes:
    rows, cols = cols, rows
  omega = 1.0 / 10000 ** (np.arange(width // 4) / (width / 4))  # (D/4,)
  col_angles, row_angles = np.outer(cols, omega), np.outer(rows, omega)
  return np.concatenate([np.sin(col_angles), np.cos(col_angles),
                         np.sin(row_angles), np.cos(row_angles)], axis=1)


def patchify(images, patch):
  """(B, H, W, C) -> (B, L, p*p*C), patches row-major, each flattened (row, col, channel)."""
  batch, height, width, channels = images.shape
  x = images.reshape(batch, height // patch, patch, width // patch, patch, channels)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, patch * patch * channels)


def embed_patches(images, w, swap_posemb_axes=False):
  """PatchEmbed plus positions (without [CLS]): (B, L, D)."""
  patch = w['patch_size']
  tokens = linear(patchify(images, patch), w['patch_embed'])
  if w['pos_embed'] is None:
    grid_h, grid_w = images.shape[1] // patch, images.shape[2] // patch
    return tokens + sincos_posemb(grid_h, grid_w, tokens.shape[-1], swap_posemb_axes)
  return tokens + w['pos_embed'][1:]


def cls_with_position(w):
  """The [CLS] token plus its position (zero for sin-cos, models_mae.py line 161)."""
  return w['cls_token'] + (0.0 if w['pos_embed'] is None else w['pos_embed'][0])


def encode(tokens, w, **options):
  """Prepend [CLS] to (B, K, D) tokens and run the encoder: (tokens (B, 1+K, D), attention)."""
  cls = np.broadcast_to(cls_with_position(w), (tokens.shape[0], 1, tokens.shape[-1]))
  return transformer(np.concatenate([cls, tokens], axis=1), w['encoder'], **options)


def vit(images, w, swap_posemb_axes=False, **options):
  """(B, H, W, C) -> {'tokens', 'cls', 'patch_mean', 'attention'} like our ViT.__call__."""
  tokens, attention_weights_ = encode(embed_patches(images, w, swap_posemb_axes), w, **options)
  return {'tokens': tokens, 'cls': tokens[:, 0], 'patch_mean': tokens[:, 1:].mean(1),
          'attention': attention_weights_}


def random_masking(tokens, noise, mask_ratio):
  """models_mae.py lines 123-148 with the noise given: (kept, mask, ids_restore)."""
  batch, length, width = tokens.shape
  len_keep = int(length * (1 - mask_ratio))
  ids_shuffle = np.argsort(noise, axis=1, kind='stable')  # ascending: small is keep
  ids_restore = np.argsort(ids_shuffle, axis=1, kind='stable')
  ids_keep = ids_shuffle[:, :len_keep]
  kept = np.take_along_axis(tokens, np.repeat(ids_keep[:, :, None], width, axis=2), axis=1)
  mask = np.ones((batch, length))
  mask[:, :len_keep] = 0
  return kept, np.take_along_axis(mask, ids_restore, axis=1), ids_restore


def mae_forward(images, noise, mask_ratio, w):
  """models_mae.py forward_encoder + forward_decoder (lines 150-196): (pred, mask)."""
  patch = w['encoder']['patch_size']
  grid_h, grid_w = images.shape[1] // patch, images.shape[2] // patch
  kept, mask, ids_restore = random_masking(embed_patches(images, w['encoder']), noise, mask_ratio)
  latent, _ = encode(kept, w['encoder'])
  x = linear(latent, w['decoder_embed'])  # (B, 1+K, Dd)
  batch, length = ids_restore.shape
  mask_tokens = np.broadcast_to(w['mask_token'], (batch, length + 1 - x.shape[1], x.shape[2]))
  x_ = np.concatenate([x[:, 1:], mask_tokens], axis=1)  # no cls token
  x_ = np.take_along_axis(x_, np.repeat(ids_restore[:, :, None], x.shape[2], axis=2), axis=1)
  x = np.concatenate([x[:, :1], x_], axis=1)  # append cls token
  decoder_pos_embed = np.concatenate(  # cls_token=True: a zero row for [CLS]
      [np.zeros((1, x.shape[2])), sincos_posemb(grid_h, grid_w, x.shape[2])], axis=0)
  x = x + decoder_pos_embed
  x, _ = transformer(x, w['decoder'])
  return linear(x, w['decoder_pred'])[:, 1:], mask
