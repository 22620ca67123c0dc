r"""Weights to and from Hugging Face transformers (GPT-2, BERT, ViT-MAE) and torchvision ResNets.

In Python:

  model = convert.from_hf('gpt2', hf_config, state_dict)  # -> our NNX model
  logits = model(input_ids)                                 # (B, T, V), as HF's .logits
  state_dict = convert.to_hf('gpt2', model)                 # the same names and shapes

`kind` is 'gpt2' (`GPT2LMHeadModel`), 'bert' (`BertForMaskedLM`) or
'vit_mae' (`ViTMAEForPreTraining`); `hf_config` is the model's config.json
as a dict; `state_dict` maps transformers' `model.state_dict()` names to
NumPy arrays. For gpt2 / bert the result is an `HFLanguageModel` whose call
returns the logits (its `.lm` is our `TransformerLM`, whose own call returns
{'hidden', 'logits'}); for vit_mae an `HFViTMAE`, called on NHWC images
`model(images, noise=noise)` -> {'pred' (B, L, p*p*C), 'mask' (B, L)}, the
masking decided by `noise` (B, L) as in the reference (argsort, the
smallest kept: facebookresearch/mae models_mae.py `random_masking`, HF
modeling_vit_mae.py `ViTMAEEmbeddings.random_masking`); its `.mae` is our
`MAEModel`. The layouts are documented in `ssl_jax/models/hf_convert.py`
(GPT-2, BERT) and `ssl_jax/models/hf_vit_mae.py`; the architectures come
from the matching method config (`ssl_jax/hf_configs.py`).
`from_torchvision_resnet(state_dict, depth)` loads torchvision's
resnet18 ... resnet152 weights into our ResNet (SimCLR's encoder).

On the command line:

  # A Hugging Face file (+ the config.json beside it) -> an export that
  # `methods.load_encoder`, the probe and `--config.train.init_from` load:
  python -m ssl_jax.convert --kind=gpt2 --weights=DIR/model.safetensors --out=EXPORT
  # An export (or a workdir, whose export/ is used) -> model.safetensors + config.json:
  python -m ssl_jax.convert --source=WORKDIR --out=HF_DIR

`.bin` files need PyTorch; `.safetensors` only the safetensors package. An
imported vit_mae exports its encoder (the ViT: what MAE exports); written
back it is a `ViTMAEModel` file (ViTMAEForPreTraining loads it with a fresh
decoder). A GPT-2 / BERT import copies the tokenizer.json beside the weights
(or `--tokenizer=PATH`) into the export, and an export holding one writes it
beside the weights it converts. The last stdout line is a JSON object: kind, direction, params, out.
"""

import json
import sys
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from flax import nnx

from ssl_jax import checkpoint, hf_configs, methods, sharding
from ssl_jax.cli import quiet_logging
from ssl_jax.config_blocks import mesh_config
from ssl_jax.errors import UserError
from ssl_jax.methods.mae import MAEModel
from ssl_jax.models import hf_convert, hf_vit_mae
from ssl_jax.models.lm import TransformerLM
from ssl_jax.models.resnet import ResNet, from_torch_state_dict
from ssl_jax.models.transformer import count_params
from ssl_jax.models.vit import ViT

TOKENIZER = 'tokenizer.json'


class HFLanguageModel(nnx.Module):
  """Our `TransformerLM` called as HF's LM heads: input ids -> logits (B, T, V)."""

  def __init__(self, lm: TransformerLM):
    self.lm = lm

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """(B, T) ids (+ BERT's segments, padding mask 1 = token) -> (B, T, V) logits."""
    return self.lm(input_ids, token_types=token_type_ids, key_mask=attention_mask)['logits']


class HFViTMAE(nnx.Module):
  """Our `MAEModel` called as `ViTMAEForPreTraining`: images and noise -> pred and mask."""

  def __init__(self, mae: MAEModel, *, mask_ratio: float, image_size: int):
    self.mae = mae
    self.mask_ratio = mask_ratio
    self.image_size = image_size

  def __call__(self, images: jax.Array, noise: jax.Array | None = None,
               rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """Normalised (B, H, W, C) images -> {'pred' (B, L, p*p*C), 'mask' (B, L), 1 = removed}.

    `noise` (B, L) decides which patches stay (the smallest); without it,
    uniform noise is drawn from `rng`.
    """
    if noise is None and rng is None:
      raise ValueError('HFViTMAE needs noise (B, L) or an rng to draw it from')
    pred, mask = self.mae(images, rng, self.mask_ratio, noise)
    return {'pred': pred, 'mask': mask}


def _build(config: ml_collections.ConfigDict, encoder_only: bool = False) -> nnx.Module:
  """The method's model (or exported encoder) for `config`, replicated on this host's devices."""
  method = methods.create(config)
  with sharding.activate(sharding.make_mesh(mesh_config()), sharding.logical_rules(config.mesh)):
    rngs = nnx.Rngs(config.seed)
    return method.build_encoder(rngs) if encoder_only else method.build(rngs)


def _params(model: nnx.Module) -> dict[str, Any]:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _grid(image_size: int, patch_size: int) -> int:
  if image_size % patch_size:
    raise ValueError(f'image_size {image_size} is not a multiple of patch_size {patch_size}')
  return image_size // patch_size


def from_hf(kind: str, hf_config: dict[str, Any],
            state_dict: Mapping[str, np.ndarray]) -> HFLanguageModel | HFViTMAE:
  """A transformers state dict (NumPy) and its config.json -> our model, wrapped as HF calls it."""
  config = hf_configs.method_config(kind, hf_config)
  model = _build(config)
  if kind == 'vit_mae':
    grid = _grid(config.data.image_size, config.model.patch_size)
    hf_convert.load_params(model, hf_vit_mae.vit_mae_from_hf(state_dict, _params(model), grid))
    return HFViTMAE(model, mask_ratio=config.model.mask_ratio,
                    image_size=config.data.image_size)
  read = hf_convert.gpt2_from_hf if kind == 'gpt2' else hf_convert.bert_from_hf
  hf_convert.load_params(model, read(state_dict, model))
  return HFLanguageModel(model)


def to_hf(kind: str, model: nnx.Module, *, image_size: int | None = None) -> dict[str, np.ndarray]:
  """Our model (as `from_hf` returns it, or bare) -> the transformers state dict (NumPy).

  A bare `MAEModel` or MAE `ViT` needs `image_size` (HF's frozen position
  buffers are written for its grid); a ViT gives `ViTMAEModel` names.
  """
  hf_configs.check_kind(kind)
  if isinstance(model, HFLanguageModel):
    model = model.lm
  if isinstance(model, HFViTMAE):
    image_size, model = image_size or model.image_size, model.mae
  wanted = {'gpt2': TransformerLM, 'bert': TransformerLM, 'vit_mae': (MAEModel, ViT)}[kind]
  if not isinstance(model, wanted):
    raise ValueError(f'to_hf({kind!r}) takes a {wanted}, not a {type(model).__name__}')
  if kind == 'gpt2':
    return hf_convert.gpt2_to_hf(_params(model))
  if kind == 'bert':
    return hf_convert.bert_to_hf(_params(model))
  if image_size is None:
    raise ValueError('to_hf(\'vit_mae\', ...) of a bare model needs image_size=')
  vit = model.encoder if isinstance(model, MAEModel) else model
  grid = _grid(image_size, vit.patch_size)
  if isinstance(model, ViT):
    return hf_vit_mae.vit_to_hf(_params(model), grid, prefix='')
  return hf_vit_mae.vit_mae_to_hf(_params(model), grid)


def from_torchvision_resnet(state_dict: Mapping[str, np.ndarray], depth: int = 50,
                            **options: Any) -> ResNet:
  """torchvision's resnet{depth} state dict (NumPy, NCHW) -> our ResNet (`models/resnet.py`).

  `options` go to `ResNet` (e.g. `stem='cifar'`); `fc.*` is not read.
  Shapes and names are checked by `resnet.from_torch_state_dict`.
  """
  with sharding.activate(sharding.make_mesh(mesh_config()), sharding.DEFAULT_RULES):
    model = nnx.eval_shape(lambda: ResNet(depth, **options, rngs=nnx.Rngs(0)))
    from_torch_state_dict(model, state_dict)  # Fills the abstract model: no random init.
  return model


# ------------------------------------------------------------------------------
# Command line: files in, files out.
# ------------------------------------------------------------------------------
_KIND = flags.DEFINE_enum('kind', None, hf_configs.KINDS, 'Model kind of --weights.')
_WEIGHTS = flags.DEFINE_string('weights', None, 'A Hugging Face .safetensors or .bin file.')
_HF_CONFIG = flags.DEFINE_string('hf_config', None,
                                 'Its config.json (default: config.json beside --weights).')
_TOKENIZER = flags.DEFINE_string(
    'tokenizer', None, 'gpt2 / bert: its tokenizer.json (default: tokenizer.json beside '
    '--weights), copied into the export so the probe and sampling can read text.')
_SOURCE = flags.DEFINE_string('source', None, 'An export directory, or a workdir with export/.')
_OUT = flags.DEFINE_string('out', None, 'Output directory (an export, or HF files).')


def read_state_dict(path: epath.PathLike) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors (safetensors' NumPy API) or .bin (torch) file as NumPy."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'no weights file at {path}')
  if path.suffix == '.safetensors':
    from safetensors.numpy import load_file
    return load_file(str(path))
  if path.suffix == '.bin':
    try:
      import torch
    except ImportError as e:
      raise UserError(f'{path} is a PyTorch file and torch is not installed: convert it to '
                      '.safetensors (e.g. with transformers\' save_pretrained('
                      'safe_serialization=True)) or install torch.') from e
    state = torch.load(str(path), map_location='cpu', weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  raise ValueError(f'{path}: expected a .safetensors or .bin file')


def _read_json(path: epath.Path) -> dict[str, Any]:
  if not path.exists():
    raise FileNotFoundError(f'no config.json at {path} (pass --hf_config=PATH)')
  return json.loads(path.read_text())


def import_hf(kind: str, weights: epath.PathLike, out: epath.PathLike,
              hf_config_path: epath.PathLike | None = None,
              tokenizer: epath.PathLike | None = None) -> dict[str, Any]:
  """HF weights + config.json -> an export in `out` (encoder/ + config.json + hf_config.json).

  A language model's tokenizer.json (`tokenizer`, else the one beside the
  weights) is copied in too: the probe scores text through it.
  """
  weights, out = epath.Path(weights), epath.Path(out)
  hf_config_path = epath.Path(hf_config_path or weights.parent / 'config.json')
  state_dict = read_state_dict(weights)
  hf_config = _read_json(hf_config_path)
  print(f'Read {len(state_dict)} tensors from {weights}', flush=True)
  config = hf_configs.method_config(kind, hf_config)
  if kind == 'vit_mae':  # MAE exports its ViT encoder alone.
    encoder = _build(config, encoder_only=True)
    grid = _grid(config.data.image_size, config.model.patch_size)
    hf_convert.load_params(encoder, hf_vit_mae.vit_encoder_from_hf(
        state_dict, _params(encoder), grid))
  else:
    encoder = from_hf(kind, hf_config, state_dict).lm
  checkpoint.export_encoder(out, encoder, config)
  (out / 'hf_config.json').write_text(json.dumps(hf_config, indent=2))
  if kind != 'vit_mae':
    _copy_tokenizer(epath.Path(tokenizer) if tokenizer else weights.parent / TOKENIZER, out,
                    required=tokenizer is not None)
  print(f'Wrote the {config.method} export to {out}', flush=True)
  return {'kind': kind, 'direction': 'import', 'params': count_params(encoder), 'out': str(out)}


def _copy_tokenizer(path: epath.Path, out: epath.Path, *, required: bool) -> None:
  """Copies a Hugging Face tokenizer.json to `out`/tokenizer.json, or says why not."""
  from ssl_jax.data.tokenizer import HuggingFaceTokenizer, load_tokenizer
  if not path.exists():
    if required:
      raise FileNotFoundError(f'no tokenizer file at {path}')
    print(f'Note: no {TOKENIZER} at {path}; copy the model\'s tokenizer.json into {out} '
          'to probe it on text (python -m ssl_jax.probe --config=configs/probe.py:lm).',
          flush=True)
    return
  if not isinstance(load_tokenizer(path), HuggingFaceTokenizer):
    print(f'Note: {path} is a character tokenizer of ours, not a Hugging Face one; not '
          'copied.', flush=True)
    return
  out.mkdir(parents=True, exist_ok=True)
  (out / TOKENIZER).write_text(path.read_text())
  print(f'Copied {path} to {out / TOKENIZER}', flush=True)


def export_hf(source: epath.PathLike, out: epath.PathLike) -> dict[str, Any]:
  """An export (or a workdir's export/) -> `out`/model.safetensors + config.json."""
  source, out = epath.Path(source), epath.Path(out)
  if not (source / 'encoder').exists() and (source / 'export' / 'encoder').exists():
    source = source / 'export'
  encoder, method = methods.load_encoder(source)
  config = method.config
  if config.method not in hf_configs.KIND_OF:
    raise ValueError(f'a {config.method} export has no Hugging Face layout here (only '
                     f'{sorted(hf_configs.KIND_OF)})')
  kind = hf_configs.KIND_OF[config.method]
  image_size = config.data.get('image_size')
  state_dict = to_hf(kind, encoder, image_size=image_size)
  base = source / 'hf_config.json'
  hf_config = hf_configs.hf_config(kind, config, _read_json(base) if base.exists() else None)
  if kind == 'vit_mae':  # The encoder alone: ViTMAEModel's names.
    hf_config['architectures'] = ['ViTMAEModel']
  out.mkdir(parents=True, exist_ok=True)
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()},
            str(out / 'model.safetensors'), metadata={'format': 'pt'})
  (out / 'config.json').write_text(json.dumps(hf_config, indent=2))
  print(f'Wrote {len(state_dict)} tensors and config.json to {out}', flush=True)
  if kind != 'vit_mae' and (source / TOKENIZER).exists():
    _copy_tokenizer(source / TOKENIZER, out, required=False)
  return {'kind': kind, 'direction': 'export', 'params': count_params(encoder), 'out': str(out)}


def main(argv: list[str]) -> None:
  """Runs the conversion the flags ask for; the last stdout line is a JSON summary."""
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  quiet_logging()
  try:
    if not _OUT.value or bool(_WEIGHTS.value) == bool(_SOURCE.value):
      raise UserError('pass --out and either --weights (with --kind) or --source')
    if _WEIGHTS.value:
      if not _KIND.value:
        raise UserError(f'--weights needs --kind (one of {", ".join(hf_configs.KINDS)})')
      summary = import_hf(_KIND.value, _WEIGHTS.value, _OUT.value, _HF_CONFIG.value,
                          _TOKENIZER.value)
    else:
      summary = export_hf(_SOURCE.value, _OUT.value)
  except (UserError, ValueError, FileNotFoundError) as e:  # A message, not a traceback.
    sys.exit(f'error: {e}')
  print(json.dumps(summary))


if __name__ == '__main__':
  app.run(main)
