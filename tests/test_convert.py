"""ssl_jax.convert: Hugging Face GPT-2 / BERT / ViT-MAE and torchvision ResNet weights in and out.

The NumPy forwards read only Hugging Face tensor names and layouts:
GPT-2 and BERT through tests/test_hf_convert.py's `hf_gpt2_logits` /
`hf_bert_logits`, ViT-MAE through `hf_mae_weights` below, which reassembles
the reference MAE's weights (timm's fused qkv, (in, out) kernels) from
`ViTMAEForPreTraining`'s separate query/key/value nn.Linear layers for the
float64 facebookresearch/mae forward of tests/numpy_vit.py. No torch, no network.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from ssl_jax import convert, hf_configs, methods
from ssl_jax.models import hf_vit_mae
from tests import numpy_vit as ref
from tests import runner, test_resnet
from tests import test_hf_convert as lm_ref

CONFIGS = {
    'gpt2': dict(vocab_size=lm_ref.VOCAB, n_positions=lm_ref.LENGTH, n_embd=lm_ref.WIDTH,
                 n_layer=2, n_head=lm_ref.HEADS, n_inner=lm_ref.MLP),
    'bert': dict(vocab_size=lm_ref.VOCAB, max_position_embeddings=lm_ref.LENGTH,
                 hidden_size=lm_ref.WIDTH, num_hidden_layers=2,
                 num_attention_heads=lm_ref.HEADS, intermediate_size=lm_ref.MLP),
    'vit_mae': dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, image_size=16, patch_size=4, num_channels=3,
                    decoder_hidden_size=16, decoder_num_hidden_layers=2,
                    decoder_num_attention_heads=2, decoder_intermediate_size=32,
                    mask_ratio=0.75, layer_norm_eps=1e-6),
}
TIED = {'lm_head.weight': 'transformer.wte.weight',
        'cls.predictions.decoder.weight': 'bert.embeddings.word_embeddings.weight',
        'cls.predictions.decoder.bias': 'cls.predictions.bias'}
FIXED = ('position_embeddings', 'decoder_pos_embed')  # HF's frozen sin-cos buffers.


def random_state_dict(kind: str, seed: int = 0, **changes) -> dict[str, np.ndarray]:
  """A state dict with HF's names and shapes, every trainable tensor random (LayerNorms too)."""
  model = convert._build(hf_configs.method_config(kind, {**CONFIGS[kind], **changes}))
  image_size = CONFIGS[kind].get('image_size')
  names = convert.to_hf(kind, model, image_size=image_size)
  rng = np.random.default_rng(seed)
  sd = {}
  for name, value in names.items():
    keep = name.endswith(FIXED)
    sd[name] = value if keep else rng.normal(0, 0.3, value.shape).astype(np.float32)
  for tied, source in TIED.items():
    if tied in sd:
      sd[tied] = sd[source]
  return sd


@pytest.mark.parametrize('kind', ['gpt2', 'bert', 'vit_mae'])
def test_round_trip_is_exact(kind):
  sd = random_state_dict(kind)
  back = convert.to_hf(kind, convert.from_hf(kind, CONFIGS[kind], sd))
  assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in sd.items()}
  for name, value in sd.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize('kind', ['gpt2', 'bert'])
def test_language_model_logits_match_numpy(kind):
  sd = random_state_dict(kind, seed=1)
  model = convert.from_hf(kind, CONFIGS[kind], sd)
  tokens = np.random.default_rng(2).integers(0, lm_ref.VOCAB, (lm_ref.LENGTH,)).astype(np.int32)
  logits = nnx.jit(lambda m, ids: m(ids))(model, tokens[None])
  assert logits.shape == (1, lm_ref.LENGTH, lm_ref.VOCAB)
  if kind == 'gpt2':
    want = lm_ref.hf_gpt2_logits(sd, tokens)
  else:
    want = lm_ref.hf_bert_logits(sd, tokens, np.zeros_like(tokens))
  np.testing.assert_allclose(logits[0], want, atol=1e-4, rtol=1e-4)


def hf_mae_weights(sd: dict[str, np.ndarray], patch: int, heads: int, decoder_heads: int):
  """`ViTMAEForPreTraining` tensors -> tests/numpy_vit.py's weight dict (timm's layout)."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  linear = lambda name: {'kernel': sd[name + '.weight'].T, 'bias': sd[name + '.bias']}
  norm = lambda name: {'scale': sd[name + '.weight'], 'bias': sd[name + '.bias']}

  def layer(prefix, num_heads):
    qkv = [linear(f'{prefix}attention.attention.{n}') for n in ('query', 'key', 'value')]
    return {'norm1': norm(prefix + 'layernorm_before'), 'norm2': norm(prefix + 'layernorm_after'),
            'attn': {'num_heads': num_heads,
                     'qkv': {'kernel': np.concatenate([w['kernel'] for w in qkv], axis=1),
                             'bias': np.concatenate([w['bias'] for w in qkv])},
                     'proj': linear(prefix + 'attention.output.dense')},
            'mlp': {'fc1': linear(prefix + 'intermediate.dense'),
                    'fc2': linear(prefix + 'output.dense')}}

  def stack(prefix, count, num_heads, final_norm):
    return {'blocks': [layer(f'{prefix}{i}.', num_heads) for i in range(count)],
            'norm': norm(final_norm)}
  conv = sd['vit.embeddings.patch_embeddings.projection.weight']  # (D, C, p, p)
  encoder_depth = len({k.split('.')[3] for k in sd if k.startswith('vit.encoder.layer.')})
  decoder_depth = len({k.split('.')[2] for k in sd if k.startswith('decoder.decoder_layers.')})
  return {
      'encoder': {'patch_size': patch, 'pos_embed': None,
                  # (row, col, channel) flattening of a patch, as numpy_vit.patchify.
                  'patch_embed': {'kernel': conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
                                  'bias': sd['vit.embeddings.patch_embeddings.projection.bias']},
                  'cls_token': sd['vit.embeddings.cls_token'].reshape(-1),
                  'encoder': stack('vit.encoder.layer.', encoder_depth, heads, 'vit.layernorm')},
      'decoder_embed': linear('decoder.decoder_embed'),
      'mask_token': sd['decoder.mask_token'].reshape(-1),
      'decoder': stack('decoder.decoder_layers.', decoder_depth, decoder_heads,
                       'decoder.decoder_norm'),
      'decoder_pred': linear('decoder.decoder_pred')}


def test_vit_mae_pred_and_mask_match_numpy_reference():
  c = CONFIGS['vit_mae']
  sd = random_state_dict('vit_mae', seed=3)
  # The frozen position buffers are HF's sin-cos with a zero [CLS] row (numpy_vit's own).
  grid = c['image_size'] // c['patch_size']
  np.testing.assert_allclose(sd['vit.embeddings.position_embeddings'][0],
                             np.concatenate([np.zeros((1, 32)), ref.sincos_posemb(grid, grid, 32)]),
                             atol=1e-6)
  model = convert.from_hf('vit_mae', c, sd)
  rng = np.random.default_rng(4)
  images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  noise = rng.uniform(size=(3, grid * grid)).astype(np.float32)
  out = nnx.jit(lambda m, x, n: m(x, noise=n))(model, images, noise)
  want_pred, want_mask = ref.mae_forward(
      images.astype(np.float64), noise, c['mask_ratio'],
      hf_mae_weights(sd, c['patch_size'], c['num_attention_heads'],
                     c['decoder_num_attention_heads']))
  np.testing.assert_array_equal(out['mask'], want_mask)
  assert want_mask.sum() == 3 * (grid * grid - int(grid * grid * (1 - c['mask_ratio'])))
  np.testing.assert_allclose(out['pred'], want_pred, atol=2e-4, rtol=2e-4)


def test_torchvision_resnet_through_convert():
  reference = np.load(test_resnet.FIXTURE)
  names, shapes = reference['resnet18_names'], reference['resnet18_shapes']
  weights = test_resnet.fake_torchvision_weights(names, shapes, test_resnet.SEED)
  model = convert.from_torchvision_resnet(weights, 18)
  pooled, _, _ = test_resnet.eval_train_and_stats(model, test_resnet.fixture_images())
  np.testing.assert_allclose(pooled, reference['resnet18_eval'], rtol=1e-4, atol=1e-4)


def write_hf_files(directory, kind, seed=0, **changes):
  directory.mkdir(parents=True, exist_ok=True)
  sd = random_state_dict(kind, seed, **changes)
  save_file(sd, str(directory / 'model.safetensors'), metadata={'format': 'pt'})
  (directory / 'config.json').write_text(
      json.dumps({**CONFIGS[kind], **changes, 'model_type': kind}))
  return sd


@pytest.mark.parametrize('kind', ['gpt2', 'vit_mae'])
def test_cli_round_trip_through_an_export(tmp_path, kind):
  sd = write_hf_files(tmp_path / 'hf', kind)
  summary = convert.import_hf(kind, tmp_path / 'hf' / 'model.safetensors', tmp_path / 'export')
  assert summary['direction'] == 'import' and summary['params'] > 0
  encoder, method = methods.load_encoder(tmp_path / 'export')
  assert method.config.method == hf_configs.METHOD_OF[kind]
  convert.export_hf(tmp_path / 'export', tmp_path / 'back')
  back = load_file(str(tmp_path / 'back' / 'model.safetensors'))
  if kind == 'vit_mae':  # The export holds the encoder: ViTMAEModel's names, no `vit.`.
    sd = {k[len('vit.'):]: v for k, v in sd.items() if k.startswith('vit.')}
  assert sorted(back) == sorted(sd)
  for name, value in sd.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)
  config = json.loads((tmp_path / 'back' / 'config.json').read_text())
  assert {k: config[k] for k in CONFIGS[kind] if k != 'layer_norm_eps'} == {
      k: v for k, v in CONFIGS[kind].items() if k != 'layer_norm_eps'}


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'ssl_jax.convert', *args],
                        capture_output=True, text=True, timeout=300)


def test_cli_prints_json_last_and_clear_errors(tmp_path):
  write_hf_files(tmp_path / 'hf', 'bert')
  done = run_cli('--kind=bert', f'--weights={tmp_path}/hf/model.safetensors',
                 f'--out={tmp_path}/export')
  assert done.returncode == 0, done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary == {'kind': 'bert', 'direction': 'import', 'params': summary['params'],
                     'out': f'{tmp_path}/export'}
  missing = run_cli('--kind=bert', f'--weights={tmp_path}/nothing.safetensors', '--out=x')
  assert missing.returncode == 1 and 'no weights file at' in missing.stderr


def test_errors_name_the_problem(tmp_path):
  sd = random_state_dict('gpt2')
  with pytest.raises(ValueError, match="unknown kind 'vit'"):
    convert.from_hf('vit', {}, sd)
  with pytest.raises(ValueError, match='transformer.wpe.weight has shape'):
    convert.from_hf('gpt2', {**CONFIGS['gpt2'], 'n_positions': 24}, sd)
  with pytest.raises(ValueError, match="activation_function='relu' is not supported"):
    convert.from_hf('gpt2', {**CONFIGS['gpt2'], 'activation_function': 'relu'}, sd)
  mae = random_state_dict('vit_mae')
  mae['decoder.decoder_pos_embed'] = mae['decoder.decoder_pos_embed'] + 0.5
  with pytest.raises(ValueError, match='decoder_pos_embed differs from the 2-D sin-cos'):
    convert.from_hf('vit_mae', CONFIGS['vit_mae'], mae)
  with pytest.raises(FileNotFoundError, match='no weights file'):
    convert.read_state_dict(tmp_path / 'model.safetensors')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'')
  try:
    import torch  # noqa: F401
  except ImportError:
    with pytest.raises(Exception, match='torch is not installed: convert it to .safetensors'):
      convert.read_state_dict(tmp_path / 'pytorch_model.bin')
  with pytest.raises(ValueError, match='sin-cos'):
    hf_vit_mae.vit_to_hf({'pos_embed': None}, 4)


def test_vit_mae_reads_transformers_5_names():
  """transformers 5.24 keeps ViTMAE layers as `vit.layers.{i}.attention.q_proj` ... in memory."""
  sd = random_state_dict('vit_mae', seed=5)
  renames = [('vit.encoder.layer.', 'vit.layers.'),
             ('decoder.decoder_layers.', 'decoder.decoder_encoder.layer.'),
             ('attention.attention.query', 'attention.q_proj'),
             ('attention.attention.key', 'attention.k_proj'),
             ('attention.attention.value', 'attention.v_proj'),
             ('attention.output.dense', 'attention.o_proj'),
             ('intermediate.dense', 'mlp.fc1'), ('.output.dense', '.mlp.fc2')]
  new = {}
  for name, value in sd.items():
    for old, replacement in renames:
      name = name.replace(old, replacement)
    new[name] = value
  assert 'vit.layers.0.mlp.fc2.bias' in new and 'vit.layers.1.attention.o_proj.weight' in new
  back = convert.to_hf('vit_mae', convert.from_hf('vit_mae', CONFIGS['vit_mae'], new))
  for name, value in sd.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize('kind', ['bert', pytest.param('gpt2', marks=pytest.mark.slow)])
def test_imported_language_model_is_probed_on_text(tmp_path, kind):
  """HF weights + tokenizer.json -> convert -> `ssl_jax.probe` lm scores held-out text."""
  from ssl_jax.data import text_sources, tokenizer
  objective = 'masked_lm' if kind == 'bert' else 'causal_lm'
  documents = text_sources.read_documents('pydoc')[:200]
  trained = tokenizer.train_tokenizer('wordpiece' if kind == 'bert' else 'bpe', documents,
                                      vocab_size=300, objective=objective)
  (tmp_path / 'hf').mkdir()
  trained.save(tmp_path / 'hf' / 'tokenizer.json')
  write_hf_files(tmp_path / 'too_small', kind)  # 40 embeddings: the ids would overflow.
  too_small = subprocess.run(
      [sys.executable, '-m', 'ssl_jax.convert', f'--kind={kind}',
       f'--weights={tmp_path / "too_small" / "model.safetensors"}',
       f'--tokenizer={tmp_path / "hf" / "tokenizer.json"}', f'--out={tmp_path / "small"}'],
      capture_output=True, text=True, timeout=300)
  assert too_small.returncode == 0, too_small.stderr[-3000:]
  write_hf_files(tmp_path / 'hf', kind, vocab_size=trained.vocab_size)
  imported = run_cli(f'--kind={kind}', f'--weights={tmp_path / "hf" / "model.safetensors"}',
                     f'--out={tmp_path / "export"}')
  assert imported.returncode == 0, imported.stderr[-3000:]
  assert (tmp_path / 'export' / 'tokenizer.json').read_text() == trained.to_json()
  probe = subprocess.run(
      [sys.executable, '-m', 'ssl_jax.probe', f'--export={tmp_path / "export"}',
       '--config=configs/probe.py:lm', '--config.data.source=pydoc',
       '--config.data.val_fraction=0.02'],
      cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=300)
  assert probe.returncode == 0, probe.stderr[-3000:]
  scores = json.loads(probe.stdout.strip().splitlines()[-1])
  assert scores['method'] == hf_configs.METHOD_OF[kind] and scores['tokens'] > 0
  assert math.isfinite(scores['val_loss']) and scores['perplexity'] == pytest.approx(
      math.exp(scores['val_loss']))
  assert scores['uniform_loss'] == pytest.approx(math.log(trained.vocab_size))
  if kind == 'bert':
    assert 0.0 <= scores['masked_accuracy'] <= 1.0
  back = run_cli(f'--source={tmp_path / "export"}', f'--out={tmp_path / "back"}')
  assert back.returncode == 0 and (tmp_path / 'back' / 'tokenizer.json').exists(), back.stderr
  mismatch = subprocess.run(
      [sys.executable, '-m', 'ssl_jax.probe', f'--export={tmp_path / "small"}',
       '--config=configs/probe.py:lm', '--config.data.source=pydoc'],
      cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=300)
  assert mismatch.returncode != 0 and 'not the tokenizer it was trained with' in mismatch.stderr


def test_imported_vit_mae_is_probed_on_images(tmp_path):
  """A converted ViT-MAE export (3 channels, 16 px) is scored on the 1-channel 8 px digits."""
  write_hf_files(tmp_path / 'hf', 'vit_mae')
  convert.import_hf('vit_mae', tmp_path / 'hf' / 'model.safetensors', tmp_path / 'export')
  probe = subprocess.run(
      [sys.executable, '-m', 'ssl_jax.probe', f'--export={tmp_path / "export"}',
       '--config=configs/probe.py:knn', '--config.data.source=digits'],
      cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True, timeout=300)
  assert probe.returncode == 0, probe.stderr[-3000:]
  scores = json.loads(probe.stdout.strip().splitlines()[-1])
  assert (scores['method'], scores['feature_dim'], scores['num_train']) == ('mae', 32, 1437)
  assert 0.1 < scores['knn_top1'] <= 1.0  # Random weights, yet above chance on digits.
