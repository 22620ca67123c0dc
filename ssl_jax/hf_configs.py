"""Hugging Face config.json <-> our resolved configs, for `ssl_jax.convert`.

`method_config(kind, hf_config)` is the config of the matching method
(configs/gpt.py, configs/bert_mlm.py, configs/mae_vit.py, default variant)
with the architecture of a Hugging Face config: exported with the weights,
it rebuilds the model in `methods.load_encoder` and `train.init_from`.
`hf_config(kind, config)` is the reverse, a config.json transformers reads.
Missing keys take transformers' defaults (GPT2Config, BertConfig,
ViTMAEConfig). What our models cannot express (another activation, no qkv
bias, relative positions, another LayerNorm eps for GPT-2 / BERT) is refused
with a ValueError that names the key.

One tolerated difference: ViTMAEConfig's `layer_norm_eps` defaults to 1e-12
(facebook/vit-mae-* say so too) while MAE's reference code, which trained
those weights, uses 1e-6 (models_mae.py L39-42, `partial(nn.LayerNorm,
eps=1e-6)`); our ViT always uses 1e-6, a relative change of ~1e-6 in the
normalised activations, and writes 1e-6 on export.
"""

import importlib.util
import pathlib
from typing import Any

import ml_collections

KINDS = ('gpt2', 'bert', 'vit_mae')
METHOD_OF = {'gpt2': 'gpt', 'bert': 'bert', 'vit_mae': 'mae'}
KIND_OF = {method: kind for kind, method in METHOD_OF.items()}
CONFIG_FILES = {'gpt2': 'gpt.py', 'bert': 'bert_mlm.py', 'vit_mae': 'mae_vit.py'}

# transformers' defaults for the keys we read (configuration_gpt2.py, _bert.py, _vit_mae.py).
DEFAULTS = {
    'gpt2': dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                 n_inner=None, activation_function='gelu_new', layer_norm_epsilon=1e-5,
                 scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False),
    'bert': dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act='gelu', max_position_embeddings=512,
                 type_vocab_size=2, layer_norm_eps=1e-12, position_embedding_type='absolute'),
    'vit_mae': dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, hidden_act='gelu', layer_norm_eps=1e-12,
                    image_size=224, patch_size=16, num_channels=3, qkv_bias=True,
                    decoder_num_attention_heads=16, decoder_hidden_size=512,
                    decoder_num_hidden_layers=8, decoder_intermediate_size=2048,
                    mask_ratio=0.75, norm_pix_loss=False),
}
# HF activation names -> our GELU switch.
GELUS = {'gelu_new': 'tanh', 'gelu_pytorch_tanh': 'tanh', 'gelu_fast': 'tanh', 'gelu': 'erf'}


def check_kind(kind: str) -> None:
  """ValueError unless `kind` is one we convert."""
  if kind not in KINDS:
    raise ValueError(f'unknown kind {kind!r}: expected one of {KINDS} (torchvision ResNets: '
                     'convert.from_torchvision_resnet)')


def _read(kind: str, hf_config: dict[str, Any]) -> dict[str, Any]:
  """`hf_config` over transformers' defaults, with what we cannot express refused."""
  c = {**DEFAULTS[kind], **hf_config}

  def refuse(key: str, allowed: Any) -> None:
    if c[key] not in allowed:
      raise ValueError(f'{kind} config {key}={c[key]!r} is not supported here (only '
                       f'{sorted(map(str, allowed))}).')
  if kind == 'gpt2':
    refuse('activation_function', GELUS)
    refuse('layer_norm_epsilon', (1e-5,))
    refuse('scale_attn_by_inverse_layer_idx', (False,))
    refuse('reorder_and_upcast_attn', (False,))
  elif kind == 'bert':
    refuse('hidden_act', GELUS)
    refuse('layer_norm_eps', (1e-12,))
    refuse('type_vocab_size', (2,))
    refuse('position_embedding_type', ('absolute',))
  else:
    refuse('hidden_act', ('gelu',))
    refuse('qkv_bias', (True,))
  return c


def load_config_file(name: str) -> ml_collections.ConfigDict:
  """`get_config()` of configs/NAME (the repository's, next to the package)."""
  path = pathlib.Path(__file__).resolve().parents[1] / 'configs' / name
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: the converter builds exports from the '
                            'repository\'s configs/ (run it from a checkout).')
  spec = importlib.util.spec_from_file_location(f'_ssl_jax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def method_config(kind: str, hf_config: dict[str, Any]) -> ml_collections.ConfigDict:
  """Our method's config (paper variant) with the architecture of `hf_config`, float32 compute."""
  check_kind(kind)
  c = _read(kind, hf_config)
  config = load_config_file(CONFIG_FILES[kind])
  if kind == 'gpt2':
    config.model.update(dict(vocab_size=c['vocab_size'], max_len=c['n_positions'],
                             width=c['n_embd'], depth=c['n_layer'], num_heads=c['n_head'],
                             mlp_dim=c['n_inner'] or 4 * c['n_embd'],
                             gelu=GELUS[c['activation_function']], use_bias=True))
    config.data.vocab_size = c['vocab_size']
  elif kind == 'bert':
    config.model.update(dict(vocab_size=c['vocab_size'], max_len=c['max_position_embeddings'],
                             width=c['hidden_size'], depth=c['num_hidden_layers'],
                             num_heads=c['num_attention_heads'], mlp_dim=c['intermediate_size'],
                             gelu=GELUS[c['hidden_act']], use_bias=True))
    config.data.vocab_size = c['vocab_size']
  else:
    config.model.update(dict(
        patch_size=c['patch_size'], width=c['hidden_size'], depth=c['num_hidden_layers'],
        num_heads=c['num_attention_heads'], mlp_dim=c['intermediate_size'],
        decoder_width=c['decoder_hidden_size'], decoder_depth=c['decoder_num_hidden_layers'],
        decoder_heads=c['decoder_num_attention_heads'],
        decoder_mlp_dim=c['decoder_intermediate_size'], mask_ratio=c['mask_ratio'],
        norm_pix_loss=c['norm_pix_loss']))
    config.data.update(dict(image_size=c['image_size'], channels=c['num_channels']))
  if kind != 'vit_mae':  # Windows no longer than the model's positions.
    config.data.seq_len = min(config.data.seq_len, config.model.max_len)
  config.model.dtype = 'float32'  # An imported model computes as its source did.
  return config


def hf_config(kind: str, config: ml_collections.ConfigDict,
              base: dict[str, Any] | None = None) -> dict[str, Any]:
  """A transformers config.json for our `config` (over `base`, e.g. the imported one)."""
  check_kind(kind)
  m = config.model
  gelu = m.get('gelu', 'tanh' if kind == 'gpt2' else 'erf')
  if kind == 'gpt2':
    ours = dict(architectures=['GPT2LMHeadModel'], model_type='gpt2',
                vocab_size=m.vocab_size, n_positions=m.max_len, n_ctx=m.max_len,
                n_embd=m.width, n_layer=m.depth, n_head=m.num_heads, n_inner=m.mlp_dim,
                activation_function='gelu_new' if gelu == 'tanh' else 'gelu',
                layer_norm_epsilon=1e-5, tie_word_embeddings=True)
  elif kind == 'bert':
    ours = dict(architectures=['BertForMaskedLM'], model_type='bert',
                vocab_size=m.vocab_size, max_position_embeddings=m.max_len,
                hidden_size=m.width, num_hidden_layers=m.depth,
                num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
                hidden_act='gelu' if gelu == 'erf' else 'gelu_new', type_vocab_size=2,
                layer_norm_eps=1e-12, position_embedding_type='absolute',
                tie_word_embeddings=True)
  else:
    ours = dict(architectures=['ViTMAEForPreTraining'], model_type='vit_mae',
                hidden_size=m.width, num_hidden_layers=m.depth,
                num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
                hidden_act='gelu', layer_norm_eps=1e-6, qkv_bias=True,
                image_size=config.data.image_size, patch_size=m.patch_size,
                num_channels=config.data.channels,
                decoder_hidden_size=m.decoder_width, decoder_num_hidden_layers=m.decoder_depth,
                decoder_num_attention_heads=m.decoder_heads,
                decoder_intermediate_size=m.decoder_mlp_dim, mask_ratio=m.mask_ratio,
                norm_pix_loss=m.norm_pix_loss)
  return {**(base or {}), **ours}
