r"""ssl_jax.convert against Hugging Face transformers itself: small random GPT-2, BERT, ViT-MAE.

Needs a second Python with torch and transformers (never the project's
requirements), e.g. `python -m venv /work/torchvenv && /work/torchvenv/bin/pip
install torch==2.13.0 transformers safetensors`. Run with the project's Python:

  python benchmarks/hf_reference_check.py --torch_python=/work/torchvenv/bin/python

1. (torch) builds each model from a small config, draws every trainable
   tensor at random (LayerNorms too), `save_pretrained`s it (tied weights
   deduplicated, as published files are) and saves inputs and outputs
   (logits; ViT-MAE's logits and mask for a given `noise`);
2. (jax) reads the files with `convert.from_hf`, runs the same inputs and
   prints the largest absolute difference per kind; then
   `python -m ssl_jax.convert` imports each file to an export and writes
   it back as model.safetensors + config.json;
3. (torch) loads those files with transformers' `from_pretrained` and
   prints the largest difference from the original model's outputs.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {
    'gpt2': dict(vocab_size=97, n_positions=32, n_embd=48, n_layer=2, n_head=4),
    'bert': dict(vocab_size=97, max_position_embeddings=32, hidden_size=48, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=96),
    'vit_mae': dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=96, image_size=32, patch_size=8, num_channels=3,
                    decoder_hidden_size=32, decoder_num_hidden_layers=2,
                    decoder_num_attention_heads=4, decoder_intermediate_size=64,
                    mask_ratio=0.75, layer_norm_eps=1e-6),
}
BATCH, LENGTH = 2, 16


def _torch_classes():
  import transformers as t
  return {'gpt2': (t.GPT2Config, t.GPT2LMHeadModel), 'bert': (t.BertConfig, t.BertForMaskedLM),
          'vit_mae': (t.ViTMAEConfig, t.ViTMAEForPreTraining)}


def _torch_outputs(kind, model, inputs):
  import torch
  with torch.no_grad():
    if kind == 'vit_mae':
      out = model(pixel_values=torch.from_numpy(inputs['images'].transpose(0, 3, 1, 2)),
                  noise=torch.from_numpy(inputs['noise']))
      return {'pred': out.logits.numpy(), 'mask': out.mask.numpy()}
    return {'logits': model(torch.from_numpy(inputs['tokens']).long()).logits.numpy()}


def _sincos_positions(model) -> None:
  """ViTMAEEmbeddings / ViTMAEDecoder.initialize_weights' sin-cos buffers (transformers 5.24)."""
  import torch
  from transformers.models.vit_mae import modeling_vit_mae as hf
  for buffer in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
    grid = int(round((buffer.shape[1] - 1) ** 0.5))
    pos = hf.build_2d_sinusoidal_position_embedding(
        height=grid, width=grid, embed_dim=buffer.shape[-1], cls_token=True)
    half = pos.shape[-1] // 2  # HF rotates the halves to the pretrained (MAE) layout.
    with torch.no_grad():
      buffer.copy_(torch.cat([pos[..., half:], pos[..., :half]], dim=-1)[None])


def torch_reference(work: pathlib.Path) -> None:
  """Stage 1: random HF models, their files, inputs and outputs under `work/KIND`."""
  import torch
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  for kind, (config_class, model_class) in _torch_classes().items():
    config = config_class(**CONFIGS[kind], attn_implementation='eager')
    model = model_class(config).eval()
    if kind == 'vit_mae':  # Published checkpoints hold sin-cos positions; a fresh 5.24 model
      # has zeros (ViTMAEPreTrainedModel._init_weights zeroes the decoder's, and
      # ViTMAEEmbeddings.initialize_weights returns early): written as HF computes them.
      _sincos_positions(model)
    with torch.no_grad():
      for name, param in model.named_parameters():
        if param.requires_grad:  # ViT-MAE's sin-cos position buffers stay.
          scale = 'norm' in name.lower() and name.endswith('weight')  # LayerNorm: 1 + noise.
          param.copy_(torch.randn_like(param) * 0.3 + float(scale))
    model.save_pretrained(work / kind)
    if kind == 'vit_mae':
      grid = (config.image_size // config.patch_size) ** 2
      inputs = {'images': rng.normal(size=(BATCH, 32, 32, 3)).astype(np.float32),
                'noise': rng.uniform(size=(BATCH, grid)).astype(np.float32)}
    else:
      inputs = {'tokens': rng.integers(0, 97, (BATCH, LENGTH)).astype(np.int32)}
    np.savez(work / kind / 'reference.npz', **inputs, **_torch_outputs(kind, model, inputs))


def torch_reload(work: pathlib.Path) -> dict:
  """Stage 3: transformers loads what `python -m ssl_jax.convert` wrote; max |diff| of outputs."""
  import transformers as t
  diffs = {}
  for kind, (_, model_class) in _torch_classes().items():
    if kind == 'vit_mae':  # An MAE export is the encoder: compare ViTMAEModel's hidden states.
      import torch
      ref = np.load(work / kind / 'reference.npz')
      pixels = torch.from_numpy(ref['images'].transpose(0, 3, 1, 2))
      noise = torch.from_numpy(ref['noise'])
      with torch.no_grad():
        original = t.ViTMAEModel.from_pretrained(work / kind).eval()(pixels, noise=noise)
        back = t.ViTMAEModel.from_pretrained(work / f'{kind}_back').eval()(pixels, noise=noise)
      diffs[kind] = float(np.abs(original.last_hidden_state.numpy()
                                 - back.last_hidden_state.numpy()).max())
      continue
    ref = dict(np.load(work / kind / 'reference.npz'))
    model = model_class.from_pretrained(work / f'{kind}_back', attn_implementation='eager')
    out = _torch_outputs(kind, model.eval(), ref)
    diffs[kind] = float(np.abs(out['logits'] - ref['logits']).max())
  return diffs


def jax_compare(work: pathlib.Path) -> dict:
  """Stage 2: our models from the HF files; max |diff| against transformers' outputs."""
  sys.path.insert(0, str(ROOT))
  from flax import nnx

  from ssl_jax import convert
  diffs = {}
  for kind in CONFIGS:
    ref = np.load(work / kind / 'reference.npz')
    hf_config = json.loads((work / kind / 'config.json').read_text())
    state_dict = convert.read_state_dict(work / kind / 'model.safetensors')
    model = convert.from_hf(kind, hf_config, state_dict)
    if kind == 'vit_mae':
      out = nnx.jit(lambda m, x, n: m(x, noise=n))(model, ref['images'], ref['noise'])
      diffs[kind] = float(np.abs(np.asarray(out['pred']) - ref['pred']).max())
      diffs['vit_mae_mask_mismatches'] = int((np.asarray(out['mask']) != ref['mask']).sum())
    else:
      logits = nnx.jit(lambda m, ids: m(ids))(model, ref['tokens'])
      diffs[kind] = float(np.abs(np.asarray(logits) - ref['logits']).max())
    for args in ([f'--kind={kind}', f'--weights={work / kind / "model.safetensors"}',
                  f'--out={work / kind}_export'],
                 [f'--source={work / kind}_export', f'--out={work / kind}_back']):
      subprocess.run([sys.executable, '-m', 'ssl_jax.convert', *args], check=True, cwd=ROOT,
                     stdout=subprocess.DEVNULL)
  return diffs


def main() -> None:
  """Runs the three stages and prints the largest differences per kind."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--torch_python', default='/work/torchvenv/bin/python')
  parser.add_argument('--stage', default='all', choices=['all', 'reference', 'reload'])
  parser.add_argument('--work', default=None)
  args = parser.parse_args()
  if args.stage == 'reference':
    torch_reference(pathlib.Path(args.work))
    return
  if args.stage == 'reload':
    print(json.dumps(torch_reload(pathlib.Path(args.work))))
    return
  with tempfile.TemporaryDirectory() as work:
    stage = [args.torch_python, __file__, f'--work={work}', '--stage']
    subprocess.run([*stage, 'reference'], check=True)
    ours = jax_compare(pathlib.Path(work))
    reloaded = subprocess.run([*stage, 'reload'], check=True, capture_output=True, text=True)
    print('max |ours - transformers| (float32):', json.dumps(ours))
    print('transformers on our written files, max |diff| from the original:',
          reloaded.stdout.strip().splitlines()[-1])


if __name__ == '__main__':
  main()
