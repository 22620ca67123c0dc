"""Map `MAEModel` / `ViT` parameters to and from Hugging Face `ViTMAEForPreTraining` state dicts.

Names and layouts follow transformers' `models/vit_mae/modeling_vit_mae.py`
(`ViTMAEEmbeddings`, `ViTMAELayer`, `ViTMAEModel`, `ViTMAEDecoder`,
`ViTMAEForPreTraining`), which re-types facebookresearch/mae's models_mae.py:

- `vit.embeddings.patch_embeddings.projection`: a Conv2d, weight
  (D, C, p, p); ours is an HWIO (p, p, C, D) conv kernel.
- `vit.embeddings.cls_token` (1, 1, D); `vit.embeddings.position_embeddings`
  (1, 1+L, D) is a frozen 2-D sin-cos buffer with a zero row for [CLS]
  (`get_2d_sincos_pos_embed`, as MAE's util/pos_embed.py); ours computes it
  from the grid, so on import it must equal ours (else the file is not a
  sin-cos MAE) and on export it is written out. Same for the decoder's
  `decoder.decoder_pos_embed`.
- `ViTMAELayer` is timm's pre-LN `Block`: `layernorm_before` (our norm1),
  separate `attention.attention.{query,key,value}` nn.Linear (out, in)
  weights (our fused qkv kernel is (D, 3, heads, head_dim)),
  `attention.output.dense` (our proj), `layernorm_after` (norm2),
  `intermediate.dense` / `output.dense` (our fc1 / fc2).
- `vit.layernorm` is the encoder's final norm; the decoder has
  `decoder_embed`, `mask_token` (1, 1, Dd), `decoder_layers.{i}`,
  `decoder_norm`, `decoder_pred`.

An encoder alone (`ViTMAEModel`) has the same names without the `vit.`
prefix. These are the names of published files (facebook/vit-mae-*) and of
`state_dict()` in transformers 4.x, and what we write. transformers 5
renamed the modules in memory (`vit.layers.{i}.attention.q_proj`, `o_proj`,
`mlp.fc1`, `mlp.fc2`; seen in 5.24.0) but still saves files in the old
names, except that its 5.24.0 `save_pretrained` writes the decoder layers as
`decoder.decoder_encoder.layer.{i}`: `legacy_names` maps all of these back
on import. Parameters are the nested dicts of `nnx.to_pure_dict(nnx.state(model,
nnx.Param))`; `hf_convert.load_params` puts such a dict into a model.
"""

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ssl_jax.models.hf_convert import Params, StateDict, check_and_take, fuse_qkv, split_qkv
from ssl_jax.models.vit import posemb_sincos_2d

# How far a checkpoint's frozen sin-cos buffer may be from ours (float32 rounding).
POSEMB_ATOL = 1e-4


# transformers 5 names (in memory, and 5.24's saved decoder) -> the published files' names.
_RENAMES = (
    (r'^(vit\.)?layers\.(\d+)\.', r'\1encoder.layer.\2.'),
    (r'^decoder\.decoder_encoder\.layer\.(\d+)\.', r'decoder.decoder_layers.\1.'),
    (r'\.attention\.q_proj\.', '.attention.attention.query.'),
    (r'\.attention\.k_proj\.', '.attention.attention.key.'),
    (r'\.attention\.v_proj\.', '.attention.attention.value.'),
    (r'\.attention\.o_proj\.', '.attention.output.dense.'),
    (r'\.mlp\.fc1\.', '.intermediate.dense.'),
    (r'\.mlp\.fc2\.', '.output.dense.'),
)


def legacy_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """A ViTMAE state dict under the published files' names, whatever transformers wrote it."""
  renamed = {}
  for name, value in state_dict.items():
    for pattern, replacement in _RENAMES:
      name = re.sub(pattern, replacement, name)
    renamed[name] = value
  return renamed


def _a(x: Any) -> np.ndarray:
  return np.asarray(x, np.float32)


def _linear_to_hf(linear: Params) -> tuple[np.ndarray, np.ndarray]:
  """Our (in, out) kernel and bias -> nn.Linear's (out, in) weight and bias."""
  return _a(linear['kernel']).T, _a(linear['bias'])


def block_to_hf(block: Params, prefix: str) -> StateDict:
  """Our pre-LN `Block` -> the tensors of one `ViTMAELayer` under `prefix`."""
  width = block['attn']['qkv']['kernel'].shape[0]
  sd = {prefix + 'layernorm_before.weight': _a(block['norm1']['scale']),
        prefix + 'layernorm_before.bias': _a(block['norm1']['bias']),
        prefix + 'layernorm_after.weight': _a(block['norm2']['scale']),
        prefix + 'layernorm_after.bias': _a(block['norm2']['bias'])}
  sd.update(split_qkv(block['attn'], prefix + 'attention.attention.'))
  sd[prefix + 'attention.output.dense.weight'] = _a(block['attn']['proj']['kernel']).reshape(
      -1, width).T
  sd[prefix + 'attention.output.dense.bias'] = _a(block['attn']['proj']['bias'])
  sd[prefix + 'intermediate.dense.weight'], sd[prefix + 'intermediate.dense.bias'] = (
      _linear_to_hf(block['mlp']['fc1']))
  sd[prefix + 'output.dense.weight'], sd[prefix + 'output.dense.bias'] = _linear_to_hf(
      block['mlp']['fc2'])
  return sd


def block_from_hf(sd: StateDict, prefix: str, like: Params) -> Params:
  """The tensors of one `ViTMAELayer` under `prefix` -> our `Block`, shaped like `like`."""
  qkv_shape = like['attn']['qkv']['kernel'].shape  # (D, 3, heads, head_dim)
  kernel, bias = fuse_qkv(sd, prefix + 'attention.attention.', qkv_shape)
  return {
      'norm1': {'scale': sd[prefix + 'layernorm_before.weight'],
                'bias': sd[prefix + 'layernorm_before.bias']},
      'attn': {'qkv': {'kernel': kernel, 'bias': bias},
               'proj': {'kernel': sd[prefix + 'attention.output.dense.weight'].T.reshape(
                            like['attn']['proj']['kernel'].shape),
                        'bias': sd[prefix + 'attention.output.dense.bias']}},
      'norm2': {'scale': sd[prefix + 'layernorm_after.weight'],
                'bias': sd[prefix + 'layernorm_after.bias']},
      'mlp': {'fc1': {'kernel': sd[prefix + 'intermediate.dense.weight'].T,
                      'bias': sd[prefix + 'intermediate.dense.bias']},
              'fc2': {'kernel': sd[prefix + 'output.dense.weight'].T,
                      'bias': sd[prefix + 'output.dense.bias']}}}


def sincos_buffer(grid: int, width: int) -> np.ndarray:
  """HF's frozen (1, 1 + grid*grid, width) sin-cos positions, a zero row first for [CLS]."""
  return np.concatenate([np.zeros((1, width), np.float32),
                         posemb_sincos_2d(grid, grid, width)])[None]


def vit_to_hf(params: Params, grid: int, prefix: str = 'vit.') -> StateDict:
  """Our ViT (sin-cos positions) -> `ViTMAEModel` tensors under `prefix`."""
  if 'pos_embed' in params:
    raise ValueError('this ViT has a learned position embedding (DINO\'s); ViTMAE has fixed '
                     'sin-cos positions: only an MAE encoder converts.')
  conv = _a(params['patch_embed']['kernel'])  # (p, p, C, D)
  width = conv.shape[-1]
  e = prefix + 'embeddings.'
  sd = {e + 'cls_token': _a(params['cls_token']),
        e + 'position_embeddings': sincos_buffer(grid, width),
        e + 'patch_embeddings.projection.weight': conv.transpose(3, 2, 0, 1),
        e + 'patch_embeddings.projection.bias': _a(params['patch_embed']['bias'])}
  for i, block in params['encoder']['blocks'].items():
    sd.update(block_to_hf(block, f'{prefix}encoder.layer.{i}.'))
  sd[prefix + 'layernorm.weight'] = _a(params['encoder']['norm']['scale'])
  sd[prefix + 'layernorm.bias'] = _a(params['encoder']['norm']['bias'])
  return sd


def vit_mae_to_hf(params: Params, grid: int) -> StateDict:
  """Our `MAEModel` -> `ViTMAEForPreTraining` state dict for a `grid` x `grid` patch grid."""
  sd = vit_to_hf(params['encoder'], grid)
  d = 'decoder.'
  sd[d + 'decoder_embed.weight'], sd[d + 'decoder_embed.bias'] = _linear_to_hf(
      params['decoder_embed'])
  sd[d + 'mask_token'] = _a(params['mask_token'])
  sd[d + 'decoder_pos_embed'] = sincos_buffer(grid, sd[d + 'mask_token'].shape[-1])
  for i, block in params['decoder']['blocks'].items():
    sd.update(block_to_hf(block, f'{d}decoder_layers.{i}.'))
  sd[d + 'decoder_norm.weight'] = _a(params['decoder']['norm']['scale'])
  sd[d + 'decoder_norm.bias'] = _a(params['decoder']['norm']['bias'])
  sd[d + 'decoder_pred.weight'], sd[d + 'decoder_pred.bias'] = _linear_to_hf(
      params['decoder_pred'])
  return sd


def _check_sincos(sd: StateDict, name: str) -> None:
  """ValueError unless the checkpoint's frozen positions are the sin-cos ones we compute."""
  want = sincos_buffer(int(round((sd[name].shape[1] - 1) ** 0.5)), sd[name].shape[-1])
  error = float(np.max(np.abs(sd[name] - want)))
  if error > POSEMB_ATOL:
    raise ValueError(f'{name} differs from the 2-D sin-cos positions by up to {error:.3g}: '
                     'this model computes them (MAE\'s fixed embedding) and cannot hold '
                     'learned ones.')


def vit_from_hf(sd: StateDict, like: Params, prefix: str = 'vit.') -> Params:
  """`ViTMAEModel` tensors under `prefix` (already checked) -> ViT parameters shaped like `like`."""
  _check_sincos(sd, prefix + 'embeddings.position_embeddings')
  e = prefix + 'embeddings.patch_embeddings.projection.'
  return {'patch_embed': {'kernel': sd[e + 'weight'].transpose(2, 3, 1, 0),
                          'bias': sd[e + 'bias']},
          'cls_token': sd[prefix + 'embeddings.cls_token'],
          'encoder': {'blocks': {i: block_from_hf(sd, f'{prefix}encoder.layer.{i}.', block)
                                 for i, block in like['encoder']['blocks'].items()},
                      'norm': {'scale': sd[prefix + 'layernorm.weight'],
                               'bias': sd[prefix + 'layernorm.bias']}}}


def vit_mae_from_hf(state_dict: Mapping[str, Any], like: Params, grid: int) -> Params:
  """`ViTMAEForPreTraining` state dict -> `MAEModel` parameters shaped like `like`."""
  sd = check_and_take(legacy_names(state_dict), vit_mae_to_hf(like, grid), 'ViTMAE')
  d = 'decoder.'
  _check_sincos(sd, d + 'decoder_pos_embed')
  return {'encoder': vit_from_hf(sd, like['encoder']),
          'decoder_embed': {'kernel': sd[d + 'decoder_embed.weight'].T,
                            'bias': sd[d + 'decoder_embed.bias']},
          'mask_token': sd[d + 'mask_token'],
          'decoder': {'blocks': {i: block_from_hf(sd, f'{d}decoder_layers.{i}.', block)
                                 for i, block in like['decoder']['blocks'].items()},
                      'norm': {'scale': sd[d + 'decoder_norm.weight'],
                               'bias': sd[d + 'decoder_norm.bias']}},
          'decoder_pred': {'kernel': sd[d + 'decoder_pred.weight'].T,
                           'bias': sd[d + 'decoder_pred.bias']}}


def vit_encoder_from_hf(state_dict: Mapping[str, Any], like: Params, grid: int) -> Params:
  """`ViTMAEModel` (no prefix) or `ViTMAEForPreTraining` (decoder ignored) -> ViT parameters."""
  state_dict = legacy_names(state_dict)
  prefix = 'vit.' if any(k.startswith('vit.') for k in state_dict) else ''
  encoder = {k: v for k, v in state_dict.items() if k.startswith(prefix)
             and not k.startswith('decoder.')}
  sd = check_and_take(encoder, vit_to_hf(like, grid, prefix), 'ViTMAE encoder')
  return vit_from_hf(sd, like, prefix)
