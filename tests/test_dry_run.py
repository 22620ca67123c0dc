"""`python -m ssl_jax.main --dry_run`: abstract state, shardings, compiled step; no data, no files.

The paper recipes' data (ImageNet, C4) is not on this machine: a dry run of
those configs passing at all shows it reads no data.
"""

import json
import subprocess

import jax
import pytest
from flax import nnx

from configs import gpt, mae_vit
from ssl_jax import methods, sharding
from ssl_jax.dry_run import dry_config
from ssl_jax.models.transformer import count_params
from tests.runner import REPO, child_env, main_command

FSDP_8 = {'mesh.data': 1, 'mesh.fsdp': 8}
# The paper recipes' configs (tfds sources that are absent here), cut to seconds.
TINY_MAE = {'data.batch_size': 16, 'data.image_size': 32, 'model.patch_size': 8,
            'model.width': 32, 'model.depth': 2, 'model.num_heads': 2, 'model.mlp_dim': 64,
            'model.decoder_width': 16, 'model.decoder_depth': 1, 'model.decoder_heads': 2,
            'model.decoder_mlp_dim': 32}
TINY_GPT = {'data.batch_size': 16, 'data.seq_len': 32, 'data.vocab_size': 512,
            'model.max_len': 32, 'model.width': 32, 'model.depth': 2, 'model.num_heads': 2,
            'model.mlp_dim': 64, 'model.remat': 'dots', 'train.grad_accum_steps': 2}


def flags(settings):
  """--config.KEY=VALUE for each of `settings`."""
  return [f'--config.{key}={value}' for key, value in settings.items()]


def dry_run(tmp_path, config, *overrides):
  """The figures a dry run prints as its last stdout line, its workdir and its stdout."""
  workdir = tmp_path / 'never_written'
  result = subprocess.run(main_command(workdir, '--dry_run', *overrides, config=config),
                          cwd=REPO, env=child_env(devices=8), capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stdout + result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1]), workdir, result.stdout


def expected(config, settings):
  """The parameter count of the model a real run would build (abstractly, in this process)
  and the method's analytic FLOPs of one step."""
  config.update_from_flattened_dict(settings)
  method_class = methods.method_class(config)
  config = dry_config(config, method_class.data_spec(config))
  mesh = sharding.make_mesh(sharding.mesh_config(1, 1, 1), jax.devices()[:1])
  method = method_class(config)
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    params = count_params(nnx.eval_shape(lambda: method.build(nnx.Rngs(0))))
  return params, method.train_flops_per_example() * config.data.batch_size


@pytest.mark.parametrize('module,tiny', [(mae_vit, TINY_MAE), (gpt, TINY_GPT)],
                         ids=['mae', 'gpt'])
def test_dry_run_compiles_the_fsdp_step_without_data_or_files(tmp_path, module, tiny):
  config_file = f'configs/{module.__name__.split(".")[-1]}.py'
  figures, workdir, stdout = dry_run(tmp_path, config_file, *flags(FSDP_8), *flags(tiny))
  assert not workdir.exists()  # Nothing written: no config.json, no checkpoints.
  params, model_flops = expected(module.get_config(), tiny)
  assert figures['params'] == params
  assert figures['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  assert figures['optimizer_state_bytes'] >= 2 * figures['param_bytes']  # Adam's mu and nu.
  # FSDP: each device's arguments hold about 1/8 of the float32 state (replicated: all of it).
  state = figures['param_bytes'] + figures['optimizer_state_bytes']
  assert figures['argument_bytes'] < state / 4
  assert figures['bytes_per_device'] >= figures['argument_bytes'] + figures['temp_bytes'] > 0
  # XLA counts a scanned micro-batch once; the figure is scaled to the whole step (GPT: 2).
  assert 0.9 < figures['flops_per_step_per_device'] * 8 / model_flops < 1.6
  assert 'per device (XLA memory_analysis' in stdout


@pytest.mark.slow
def test_dry_run_of_a_view_method_and_its_refusals(tmp_path):
  """SimCLR's batch is views (B, 2, S, S, C); its accumulation refusal comes before compiling."""
  figures, _, _ = dry_run(
      tmp_path, 'configs/simclr_resnet.py:local', '--config.data.batch_size=16',
      '--config.model.remat=full')
  assert figures['params'] > 0 and figures['remat'] == 'full'
  result = subprocess.run(
      main_command(tmp_path / 'w', '--dry_run', '--config.train.grad_accum_steps=2',
                   config='configs/simclr_resnet.py:local'),
      cwd=REPO, env=child_env(devices=8), capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and 'grad_accum_steps=2' in result.stderr


def test_big_variants_have_the_reference_sizes():
  """gpt.py:xl is GPT-2 XL and mae_vit.py:vit_h is ViT-H/14, counted without allocating them.

  Hugging Face gpt2-xl has 1,557,611,200 parameters; ViT-H/14 ~630M (632M
  with its classifier, Dosovitskiy et al. 2021 Table 1).
  """
  assert expected(gpt.get_config('xl'), {})[0] == 1_557_611_200
  config = mae_vit.get_config('vit_h')
  assert (config.model.patch_size, config.model.width, config.model.depth,
          config.model.num_heads, config.model.mlp_dim) == (14, 1280, 32, 16, 5120)
  assert expected(config, {})[0] == 656_613_964  # Encoder 630,435,840 + decoder.
