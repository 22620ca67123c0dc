"""The seams: evaluations as a registry with cadences, capabilities checked at setup, layering."""

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

from ssl_jax import config_blocks, methods, train
from ssl_jax.errors import ConfigError
from ssl_jax.eval import registry
from ssl_jax.methods.base import CAPABILITIES, Method
from tests import runner

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {'mae_vit': ('', 'local'), 'simclr_resnet': ('', 'local', 'cifar10'),
           'dino_vit': ('', 'local'), 'bert_mlm': ('', 'local'), 'gpt': ('', 'local', 'char'),
           'finetune': ('', 'vit_l', 'local')}


def load_config(name: str, variant: str = ''):
  return importlib.import_module(f'configs.{name}').get_config(variant or None)


# ------------------------------------------------------------- capabilities ---
@pytest.mark.parametrize('name', sorted(methods.METHODS))
def test_declared_capabilities_are_the_hooks_a_method_defines(name):
  cls = methods.method_class(load_config({'mae': 'mae_vit', 'simclr': 'simclr_resnet',
                                          'dino': 'dino_vit', 'bert': 'bert_mlm',
                                          'gpt': 'gpt', 'finetune': 'finetune'}[name]))
  defined = {capability for capability, hooks in CAPABILITIES.items()
             if all(getattr(cls, hook) is not getattr(Method, hook) for hook in hooks)}
  assert set(cls.capabilities) == defined


def test_a_capability_without_its_hooks_is_refused_when_the_class_is_defined():
  with pytest.raises(TypeError, match="declares 'features' but does not define"):
    type('NoFeatures', (Method,), {'capabilities': frozenset({'features'})})
  with pytest.raises(TypeError, match='unknown'):
    type('Typo', (Method,), {'capabilities': frozenset({'featurez'})})


def test_an_evaluation_the_method_cannot_do_is_refused_before_any_data_is_read(tmp_path):
  config = load_config('gpt', 'local')
  with config.unlocked():
    config.eval.knn.enabled = True
    config.data.source = f'text:{tmp_path}/no_such_file.txt'  # Never opened.
  with pytest.raises(ConfigError, match=r"config.eval.knn.enabled=True, but method 'gpt' "
                                        r"cannot do it: knn needs the 'features' capability"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not list((tmp_path / 'run').iterdir())  # No config.json, no checkpoint.


def test_the_command_line_names_the_evaluation_and_the_method(tmp_path):
  result = runner.run_main(tmp_path, '--config.eval.online_probe.enabled=True',
                           '--config.train.steps=1')
  assert result.returncode != 0
  assert "config.eval.online_probe.enabled=True, but method 'mae' cannot do it" in result.stderr
  assert 'Traceback' not in result.stderr and not (tmp_path / 'config.json').exists()


def test_label_reading_evaluations_need_both_splits():
  config = load_config('mae_vit', 'local')
  config.eval.test_source = ''
  with pytest.raises(ConfigError, match='config.eval.knn.enabled=True needs labelled splits'):
    registry.check(config, methods.method_class(config))
  config = load_config('mae_vit', 'local')
  config.eval.knn.every = -1
  with pytest.raises(ConfigError, match=r'config.eval.knn.every=-1'):
    registry.check(config, methods.method_class(config))


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_every_config_variant_passes_the_setup_check(name):
  for variant in CONFIGS[name]:
    config = load_config(name, variant)
    registry.check(config, methods.method_class(config))
    assert set(registry.enabled(config)) <= set(registry.REGISTRY)


def test_eval_blocks_reject_unknown_keys_by_their_full_name():
  with pytest.raises(ValueError, match=r"Unknown config.eval.knn keys \['kk'\]"):
    config_blocks.eval_config(knn=dict(kk=1))
  with pytest.raises(ValueError, match=r"Unknown config.eval keys \['knn_k'\]"):
    config_blocks.eval_config(knn_k=5)
  block = config_blocks.eval_config(knn=dict(enabled=True, k=5))
  assert block.knn.enabled and block.knn.k == 5 and block.knn.temperature == 0.07


# ----------------------------------------------------------------- cadence ---
def test_each_evaluation_runs_at_its_own_cadence_and_at_the_end(tmp_path):
  """kNN every 4 steps, the linear probe only at the end, pictures every 6 (and at the end)."""
  result = runner.run_main(
      tmp_path, *runner.TINY, '--config.train.steps=8', '--config.train.eval_every=0',
      '--config.eval.knn.enabled=True', '--config.eval.knn.every=4',
      '--config.eval.linear_probe.enabled=True', '--config.eval.linear_probe.steps=20',
      '--config.eval.pictures.every=6', '--config.eval.random_init_baseline=False')
  assert result.returncode == 0, result.stdout + result.stderr
  records = runner.read_metrics(tmp_path)
  assert [r['step'] for r in records if 'knn_top1' in r] == [4, 8]
  assert [r['step'] for r in records if 'linear_top1' in r] == [8]
  assert sorted(p.name for p in (tmp_path / 'images').glob('*.png')) == [
      'step_0000006.png', 'step_0000008.png']
  # The end-of-run lines are the evaluations' own.
  assert 'kNN top-1 (k=20), digits:train -> digits:test: trained' in result.stdout
  assert 'linear probe top-1, digits:train -> digits:test: trained' in result.stdout


# ---------------------------------------------------------------- layering ---
def test_loading_a_config_file_imports_no_jax():
  code = ('import importlib, sys\n'
          + ''.join(f'importlib.import_module("configs.{name}").get_config({v or None!r})\n'
                    for name, variants in CONFIGS.items() for v in variants)
          + 'heavy = sorted(m for m in sys.modules if m.split(".")[0] in '
            '("jax", "flax", "optax", "orbax", "grain"))\n'
          + 'assert not heavy, heavy\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr


def package_imports() -> dict[str, set[str]]:
  """{'eval': {'methods', 'data', ...}}: which ssl_jax sub-packages each one imports."""
  arrows: dict[str, set[str]] = {}
  for path in (REPO / 'ssl_jax').rglob('*.py'):
    parts = path.relative_to(REPO / 'ssl_jax').with_suffix('').parts
    source = parts[0]
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('ssl_jax'):
        names = [f'{node.module}.{alias.name}' for alias in node.names]
      elif isinstance(node, ast.Import):
        names = [alias.name for alias in node.names if alias.name.startswith('ssl_jax')]
      for name in names:
        target = name.split('.')[1] if '.' in name else ''
        if target and target != source:
          arrows.setdefault(source, set()).add(target)
  return arrows


def test_no_import_cycle_between_evaluations_methods_and_checkpoints():
  arrows = package_imports()
  assert 'methods' in arrows['eval']  # Evaluations call method hooks...
  assert 'eval' not in arrows.get('methods', set())  # ...and methods never import eval.
  assert 'methods' not in arrows.get('checkpoint', set())
  assert arrows.get('config_blocks', set()) <= {'errors'}
  assert not {'eval', 'methods', 'train'} & arrows.get('data', set())
  assert not {'eval', 'methods', 'train', 'data'} & arrows.get('models', set())
