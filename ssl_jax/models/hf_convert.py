"""Map `TransformerLM` parameters to and from Hugging Face PyTorch state dicts.

Names and layouts follow `GPT2LMHeadModel` and `BertForMaskedLM` in Hugging
Face transformers (`modeling_gpt2.py`, `modeling_bert.py`), so weights
published there load here and ours load there (as NumPy arrays; call
`torch.from_numpy` on the other side). GPT-2 stores its linear layers as
`Conv1D` with (in, out) weights, like our kernels: the fused `c_attn` weight
is our qkv kernel reshaped, which is why nanoGPT's loader transposes only
because it uses `nn.Linear`. BERT's `nn.Linear` weights are (out, in), so
they are transposed. The tied output weights (`lm_head.weight`,
`cls.predictions.decoder.weight`) are written as copies of the token
embedding and, when read, must equal it.

Parameters here are the nested dicts of `nnx.to_pure_dict(nnx.state(model,
nnx.Param))`; `load_params` puts such a dict into a model.

Both layouts have a bias in every Linear and LayerNorm. A model built with
`use_bias=False` (nanoGPT's bias=False, configs/gpt.py:char) is refused in
both directions with a ValueError that says so: reading a checkpoint into it
would drop trained biases, and nanoGPT itself loads GPT-2 weights only into
a model with bias=True (model.py L222-225). The activation is not in a state
dict: a model with `gelu='erf'` exported here needs
`activation_function='gelu'` in the Hugging Face config (GPT-2's is gelu_new).
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from ssl_jax.models.lm import TransformerLM

QKV_NAMES = ('query', 'key', 'value')  # BERT's and ViT-MAE's separate attention Linears.
Params = dict[str, Any]
StateDict = dict[str, np.ndarray]

# Buffers and heads that HF checkpoints carry and our model has no use for.
IGNORED = re.compile(r'(\.attn\.(masked_)?bias$|position_ids$|^bert\.pooler\.|'
                     r'^cls\.seq_relationship\.)')


def _ln(params: Params) -> tuple[np.ndarray, np.ndarray]:
  return np.asarray(params['scale']), np.asarray(params['bias'])


def _require_biases(params: Params, layout: str) -> None:
  """ValueError unless the model has biases, as every Linear and LayerNorm of `layout` does."""
  if 'bias' not in params['blocks'][0]['mlp']['fc1']:
    raise ValueError(f'this model has no biases (config.model.use_bias=False, nanoGPT\'s '
                     f'bias=False) but {layout} has one in every Linear and LayerNorm: convert '
                     'a model built with use_bias=True.')


def split_qkv(attn: Params, prefix: str) -> StateDict:
  """Our fused qkv (D, 3, heads, head_dim) -> separate `{prefix}{query,key,value}` nn.Linears.

  BERT (`attention.self.`) and ViT-MAE (`attention.attention.`) keep query,
  key and value as three (out, in) nn.Linear weights with their biases.
  """
  kernel, bias = np.asarray(attn['qkv']['kernel']), np.asarray(attn['qkv']['bias'])
  width = kernel.shape[0]
  sd = {}
  for k, name in enumerate(QKV_NAMES):
    sd[f'{prefix}{name}.weight'] = kernel[:, k].reshape(width, -1).T
    sd[f'{prefix}{name}.bias'] = bias[k].reshape(-1)
  return sd


def fuse_qkv(sd: Mapping[str, Any], prefix: str,
             qkv_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """`{prefix}{query,key,value}` nn.Linears -> our fused (kernel, bias) of `qkv_shape`."""
  kernel = np.stack([sd[f'{prefix}{n}.weight'].T.reshape(qkv_shape[0], *qkv_shape[2:])
                     for n in QKV_NAMES], axis=1)
  bias = np.stack([sd[f'{prefix}{n}.bias'].reshape(qkv_shape[2:]) for n in QKV_NAMES])
  return kernel, bias


def gpt2_to_hf(params: Params) -> StateDict:
  """Our GPT-2 parameters -> `GPT2LMHeadModel` state dict (NumPy, HF names and shapes)."""
  _require_biases(params, "Hugging Face's GPT2LMHeadModel")
  sd = {'transformer.wte.weight': params['token_embed']['embedding'],
        'transformer.wpe.weight': params['position_embed']['embedding']}
  for i, block in params['blocks'].items():
    prefix = f'transformer.h.{i}.'
    width = block['attn']['qkv']['kernel'].shape[0]
    sd[prefix + 'ln_1.weight'], sd[prefix + 'ln_1.bias'] = _ln(block['norm1'])
    sd[prefix + 'attn.c_attn.weight'] = np.reshape(block['attn']['qkv']['kernel'], (width, -1))
    sd[prefix + 'attn.c_attn.bias'] = np.reshape(block['attn']['qkv']['bias'], (-1,))
    sd[prefix + 'attn.c_proj.weight'] = np.reshape(block['attn']['proj']['kernel'], (-1, width))
    sd[prefix + 'attn.c_proj.bias'] = block['attn']['proj']['bias']
    sd[prefix + 'ln_2.weight'], sd[prefix + 'ln_2.bias'] = _ln(block['norm2'])
    sd[prefix + 'mlp.c_fc.weight'] = block['mlp']['fc1']['kernel']
    sd[prefix + 'mlp.c_fc.bias'] = block['mlp']['fc1']['bias']
    sd[prefix + 'mlp.c_proj.weight'] = block['mlp']['fc2']['kernel']
    sd[prefix + 'mlp.c_proj.bias'] = block['mlp']['fc2']['bias']
  sd['transformer.ln_f.weight'], sd['transformer.ln_f.bias'] = _ln(params['final_norm'])
  sd['lm_head.weight'] = sd['transformer.wte.weight']
  return {name: np.array(value, np.float32) for name, value in sd.items()}


def bert_to_hf(params: Params) -> StateDict:
  """Our BERT parameters -> `BertForMaskedLM` state dict (NumPy, HF names and shapes)."""
  _require_biases(params, "Hugging Face's BertForMaskedLM")
  sd = {'bert.embeddings.word_embeddings.weight': params['token_embed']['embedding'],
        'bert.embeddings.position_embeddings.weight': params['position_embed']['embedding'],
        'bert.embeddings.token_type_embeddings.weight': params['type_embed']['embedding']}
  sd['bert.embeddings.LayerNorm.weight'], sd['bert.embeddings.LayerNorm.bias'] = _ln(
      params['embed_norm'])
  for i, block in params['blocks'].items():
    prefix = f'bert.encoder.layer.{i}.'
    width = block['attn']['qkv']['kernel'].shape[0]
    sd.update(split_qkv(block['attn'], prefix + 'attention.self.'))
    sd[prefix + 'attention.output.dense.weight'] = np.reshape(
        block['attn']['proj']['kernel'], (-1, width)).T
    sd[prefix + 'attention.output.dense.bias'] = block['attn']['proj']['bias']
    sd[prefix + 'attention.output.LayerNorm.weight'], sd[
        prefix + 'attention.output.LayerNorm.bias'] = _ln(block['norm1'])
    sd[prefix + 'intermediate.dense.weight'] = np.transpose(block['mlp']['fc1']['kernel'])
    sd[prefix + 'intermediate.dense.bias'] = block['mlp']['fc1']['bias']
    sd[prefix + 'output.dense.weight'] = np.transpose(block['mlp']['fc2']['kernel'])
    sd[prefix + 'output.dense.bias'] = block['mlp']['fc2']['bias']
    sd[prefix + 'output.LayerNorm.weight'], sd[prefix + 'output.LayerNorm.bias'] = _ln(
        block['norm2'])
  sd['cls.predictions.bias'] = params['mlm_bias']
  sd['cls.predictions.transform.dense.weight'] = np.transpose(params['mlm_dense']['kernel'])
  sd['cls.predictions.transform.dense.bias'] = params['mlm_dense']['bias']
  sd['cls.predictions.transform.LayerNorm.weight'], sd[
      'cls.predictions.transform.LayerNorm.bias'] = _ln(params['mlm_norm'])
  sd['cls.predictions.decoder.weight'] = sd['bert.embeddings.word_embeddings.weight']
  sd['cls.predictions.decoder.bias'] = sd['cls.predictions.bias']
  return {name: np.array(value, np.float32) for name, value in sd.items()}


def check_and_take(state_dict: Mapping[str, Any], want: StateDict, what: str) -> StateDict:
  """The arrays of `state_dict` for the names and shapes of `want`; clear errors otherwise."""
  # Old TF-converted BERT checkpoints name LayerNorm parameters gamma / beta.
  renamed = {re.sub(r'\.gamma$', '.weight', re.sub(r'\.beta$', '.bias', k)): v
             for k, v in state_dict.items()}
  missing = sorted(set(want) - set(renamed))
  unknown = sorted(k for k in set(renamed) - set(want) if not IGNORED.search(k))
  if missing or unknown:
    raise ValueError(f'{what} state dict does not fit this model: missing {missing[:5]}'
                     f'{"..." if len(missing) > 5 else ""}, unexpected {unknown[:5]}'
                     f'{"..." if len(unknown) > 5 else ""}.')
  taken = {}
  for name, reference in want.items():
    value = np.asarray(renamed[name], np.float32)
    if value.shape != reference.shape:
      raise ValueError(f'{what} state dict: {name} has shape {value.shape}, the model '
                       f'expects {reference.shape}.')
    taken[name] = value
  return taken


def _tied(sd: StateDict, tied: str, embedding: str) -> None:
  if not np.array_equal(sd[tied], sd[embedding]):
    raise ValueError(f'{tied} differs from {embedding}: this model ties them.')


def gpt2_from_hf(state_dict: Mapping[str, Any], model: TransformerLM) -> Params:
  """`GPT2LMHeadModel` state dict (arrays) -> parameters of `model`'s shape."""
  like = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  sd = dict(state_dict)
  if 'lm_head.weight' not in sd:  # A GPT2Model checkpoint: no head, no prefix.
    sd = {('transformer.' + k if not k.startswith('transformer.') else k): v
          for k, v in sd.items()}
    sd['lm_head.weight'] = sd.get('transformer.wte.weight')
  sd = check_and_take(sd, gpt2_to_hf(like), 'GPT-2')
  _tied(sd, 'lm_head.weight', 'transformer.wte.weight')
  params = {'token_embed': {'embedding': sd['transformer.wte.weight']},
            'position_embed': {'embedding': sd['transformer.wpe.weight']},
            'final_norm': {'scale': sd['transformer.ln_f.weight'],
                           'bias': sd['transformer.ln_f.bias']},
            'blocks': {}}
  for i, block in like['blocks'].items():
    p = f'transformer.h.{i}.'
    params['blocks'][i] = {
        'norm1': {'scale': sd[p + 'ln_1.weight'], 'bias': sd[p + 'ln_1.bias']},
        'attn': {'qkv': {'kernel': sd[p + 'attn.c_attn.weight'].reshape(
                             block['attn']['qkv']['kernel'].shape),
                         'bias': sd[p + 'attn.c_attn.bias'].reshape(
                             block['attn']['qkv']['bias'].shape)},
                 'proj': {'kernel': sd[p + 'attn.c_proj.weight'].reshape(
                              block['attn']['proj']['kernel'].shape),
                          'bias': sd[p + 'attn.c_proj.bias']}},
        'norm2': {'scale': sd[p + 'ln_2.weight'], 'bias': sd[p + 'ln_2.bias']},
        'mlp': {'fc1': {'kernel': sd[p + 'mlp.c_fc.weight'], 'bias': sd[p + 'mlp.c_fc.bias']},
                'fc2': {'kernel': sd[p + 'mlp.c_proj.weight'],
                        'bias': sd[p + 'mlp.c_proj.bias']}}}
  return params


def bert_from_hf(state_dict: Mapping[str, Any], model: TransformerLM) -> Params:
  """`BertForMaskedLM` / `BertForPreTraining` state dict -> parameters of `model`'s shape."""
  like = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  sd = dict(state_dict)
  sd.setdefault('cls.predictions.decoder.bias', sd.get('cls.predictions.bias'))
  sd.setdefault('cls.predictions.decoder.weight',
                sd.get('bert.embeddings.word_embeddings.weight'))
  sd = check_and_take(sd, bert_to_hf(like), 'BERT')
  _tied(sd, 'cls.predictions.decoder.weight', 'bert.embeddings.word_embeddings.weight')
  _tied(sd, 'cls.predictions.decoder.bias', 'cls.predictions.bias')
  e = 'bert.embeddings.'
  params = {'token_embed': {'embedding': sd[e + 'word_embeddings.weight']},
            'position_embed': {'embedding': sd[e + 'position_embeddings.weight']},
            'type_embed': {'embedding': sd[e + 'token_type_embeddings.weight']},
            'embed_norm': {'scale': sd[e + 'LayerNorm.weight'], 'bias': sd[e + 'LayerNorm.bias']},
            'mlm_dense': {'kernel': sd['cls.predictions.transform.dense.weight'].T,
                          'bias': sd['cls.predictions.transform.dense.bias']},
            'mlm_norm': {'scale': sd['cls.predictions.transform.LayerNorm.weight'],
                         'bias': sd['cls.predictions.transform.LayerNorm.bias']},
            'mlm_bias': sd['cls.predictions.bias'],
            'blocks': {}}
  for i, block in like['blocks'].items():
    p = f'bert.encoder.layer.{i}.'
    qkv_shape = block['attn']['qkv']['kernel'].shape  # (D, 3, heads, head_dim)
    kernel, bias = fuse_qkv(sd, p + 'attention.self.', qkv_shape)
    params['blocks'][i] = {
        'attn': {'qkv': {'kernel': kernel, 'bias': bias},
                 'proj': {'kernel': sd[p + 'attention.output.dense.weight'].T.reshape(
                              block['attn']['proj']['kernel'].shape),
                          'bias': sd[p + 'attention.output.dense.bias']}},
        'norm1': {'scale': sd[p + 'attention.output.LayerNorm.weight'],
                  'bias': sd[p + 'attention.output.LayerNorm.bias']},
        'mlp': {'fc1': {'kernel': sd[p + 'intermediate.dense.weight'].T,
                        'bias': sd[p + 'intermediate.dense.bias']},
                'fc2': {'kernel': sd[p + 'output.dense.weight'].T,
                        'bias': sd[p + 'output.dense.bias']}},
        'norm2': {'scale': sd[p + 'output.LayerNorm.weight'],
                  'bias': sd[p + 'output.LayerNorm.bias']}}
  return params


def load_params(model: TransformerLM, params: Params) -> None:
  """Writes a nested parameter dict (as the `*_from_hf` functions return) into `model`."""
  state = nnx.state(model, nnx.Param)
  # Each array lands with the dtype and sharding of the parameter it replaces.
  placed = jax.tree.map(
      lambda new, old: jax.device_put(np.asarray(new, old.dtype), getattr(old, 'sharding', None)),
      params, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, placed)
  nnx.update(model, state)
