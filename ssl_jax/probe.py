r"""Evaluates an exported encoder with a paper's protocol (configs/probe.py).

  python -m ssl_jax.probe --workdir=DIR [--config=configs/probe.py:VARIANT] \
      [--config.eval.train_source=... --config.eval.test_source=... --config.KEY=VALUE ...]
  python -m ssl_jax.probe --export=PATH ...   # an export directory without its workdir

Loads DIR/export (`methods.load_encoder`) and, for an image encoder, scores
its frozen features on the labelled train / test splits: the weighted kNN
(`eval.knn`, ssl_jax/eval/knn.py) and the variant's linear probe
(`eval.linear_probe`, `linear_probe.protocol_linear_probe`). The splits are
`--config.eval.*`, else the export's `eval.train_source` / `test_source`,
else derived from `data.source` (digits -> digits:train / digits:test).
GPT and BERT exports are scored on the held-out split of their text (the
run's, or `--config.data.source=text:PATH` / pydoc): `val_loss`,
`perplexity` and, for BERT, `masked_accuracy`. `--random_init` scores a
freshly initialised encoder of the export's shape: the baseline.

Prints progress, writes DIR/probe.json (EXPORT/probe.json with --export;
probe_random_init.json with --random_init) and prints the results as a
JSON object on the last stdout line.
"""

import json
import math
import pathlib
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from ssl_jax import cli, host_memory
from ssl_jax.errors import UserError

_DEFAULT_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'probe.py')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Probe protocols: configs/probe.py[:knn|mae|simclr|dino|lm] (default: '
    'configs/probe.py, the mae protocol).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a run; its export/ is probed.')
_EXPORT = flags.DEFINE_string('export', None, 'An export directory (encoder/ + config.json).')
_RANDOM_INIT = flags.DEFINE_bool(
    'random_init', False, 'Probe a freshly initialised encoder of the export\'s shape.')

USAGE = ('python -m ssl_jax.probe --workdir=DIR | --export=PATH '
         '[--config=configs/probe.py:VARIANT] [--config.KEY=VALUE ...]')


def progress(message: str) -> None:
  """One progress line on stdout (the results' JSON line comes last)."""
  print(f'probe: {message}', flush=True)


# ------------------------------------------------------------------------------
# The data: the export's config with the probe's overrides.
# ------------------------------------------------------------------------------
def derived_sources(source: str) -> tuple[str, str]:
  """(train, test) labelled splits of an image source spec, where it has a known split."""
  if source.split(':')[0] == 'digits':
    return 'digits:train', 'digits:test'
  raise UserError(
      f'cannot tell the labelled train / test splits of data.source={source!r}: set '
      '--config.eval.train_source and --config.eval.test_source (e.g. '
      'tfds:imagenet2012:train and tfds:imagenet2012:validation, or two folder:PATH)')


def run_config_for_probe(run_config, probe_config):
  """The export's config with the probe's data and eval overrides applied."""
  config = run_config.copy_and_resolve_references()
  for key, value in probe_config.data.items():
    if value is not None:
      config.data[key] = value
  config.eval.batch_size = probe_config.eval.batch_size
  if config.data.get('objective') is None:  # Image methods: labelled splits.
    train, test = probe_config.eval.train_source, probe_config.eval.test_source
    if probe_config.data.source is None and not (train and test):
      train = train or config.eval.get('train_source')
      test = test or config.eval.get('test_source')
    if not (train and test):
      derived = derived_sources(config.data.source)
      train, test = train or derived[0], test or derived[1]
    config.eval.train_source, config.eval.test_source = train, test
  return config


# ------------------------------------------------------------------------------
# Image encoders: kNN and the linear-probe protocol on frozen features.
# ------------------------------------------------------------------------------
def split_features(encoder, method, config, probe_config, mesh):
  """{'train': (features, labels), 'test': (...)} of the labelled splits."""
  from ssl_jax.eval import passes
  block = probe_config.eval.linear_probe
  if block.enabled and block.n_last_blocks:
    features_method = _LastBlocks(config, block)
  else:
    features_method = method
  labelled, splits = passes.LabelledData(config), {}
  for name, spec in (('train', config.eval.train_source), ('test', config.eval.test_source)):
    start = time.perf_counter()
    features, labels = passes.extract_features(features_method, encoder, labelled(spec), mesh)
    if len(labels) == 0 or (labels < 0).any():
      raise UserError(f'{spec} has no labels: the probes need a labelled source (digits, an '
                      'npz with `labels`, a class-per-folder tree, a labelled tfds split)')
    progress(f'{name} features of {spec}: {features.shape[0]} x {features.shape[1]} in '
             f'{time.perf_counter() - start:.1f} s')
    splits[name] = (features, labels)
  return splits


class _LastBlocks:
  """A stand-in for the method whose `features` are DINO's last-n [CLS] (block_features.py)."""

  def __init__(self, config, block):
    self.config, self.block = config, block

  def features(self, encoder, images):
    """uint8 images -> the concatenated [CLS] of the last n blocks (+ patch mean)."""
    from ssl_jax.eval.block_features import last_blocks_features
    return last_blocks_features(encoder, images, mean=self.config.data.mean,
                                std=self.config.data.std,
                                n_last_blocks=self.block.n_last_blocks,
                                avgpool_patchtokens=self.block.avgpool_patchtokens)

  def __hash__(self):  # A static argument of the jitted feature pass.
    return hash((self.block.n_last_blocks, self.block.avgpool_patchtokens,
                 tuple(self.config.data.mean), tuple(self.config.data.std)))

  def __eq__(self, other):
    return isinstance(other, _LastBlocks) and hash(self) == hash(other)


def image_probe(encoder, method, config, probe_config, mesh) -> dict:
  """kNN and linear-probe results of an image encoder."""
  from ssl_jax.eval import knn, linear_probe
  knn_block, linear_block = probe_config.eval.knn, probe_config.eval.linear_probe
  splits = split_features(encoder, method, config, probe_config, mesh)
  (train, train_labels), (test, test_labels) = splits['train'], splits['test']
  results = {'train_source': config.eval.train_source, 'test_source': config.eval.test_source,
             'num_train': len(train), 'num_test': len(test), 'feature_dim': train.shape[1]}
  if knn_block.enabled:
    start = time.perf_counter()
    results['knn_top1'] = knn.knn_accuracy(train, train_labels, test, test_labels,
                                           k=knn_block.k, temperature=knn_block.temperature)
    results['knn_seconds'] = time.perf_counter() - start
    progress(f'kNN top-1 (k={knn_block.k}): {results["knn_top1"]:.4f}')
  if linear_block.enabled:
    start = time.perf_counter()
    progress(f'linear probe ({probe_config.protocol}: {linear_block.optimizer}, '
             f'{linear_block.epochs} epochs) ...')
    results.update(linear_probe.protocol_linear_probe(train, train_labels, test, test_labels,
                                                      linear_block))
    results['linear_seconds'] = time.perf_counter() - start
    progress(f'linear top-1: {results["linear_top1"]:.4f} (batch {results["linear_batch_size"]}, '
             f'{results["linear_steps"]} steps)')
  return results


# ------------------------------------------------------------------------------
# Fine-tuning: a run of configs/finetune.py on the trainer, from the export.
# ------------------------------------------------------------------------------
def finetune_run_config(config, probe_config, export_dir: pathlib.Path, random_init: bool):
  """The probe's `finetune` config, pointed at the export and the labelled splits.

  The images are cut as the encoder was trained (size, channels, mean and
  std from the export's config); the run trains on eval.train_source and
  scores its classifier on eval.test_source.
  """
  from ssl_jax.methods.finetune import ENCODERS
  recipe = probe_config.finetune_recipe
  kind = ENCODERS.get(config.method)
  if kind is None:
    raise UserError(f'fine-tuning takes {sorted(ENCODERS)} exports, not a {config.method!r} one')
  if (kind == 'resnet') != recipe.startswith('resnet'):
    want = 'finetune_resnet[_local]' if kind == 'resnet' else 'finetune[_vit_l|_local]'
    raise UserError(f'the {config.method} export is a {kind}, and the fine-tuning recipe '
                    f'{recipe or "(ViT-B)"!r} is for a {"resnet" if kind == "vit" else "ViT"}: '
                    f'use --config=configs/probe.py:{want}')
  ft = probe_config.finetune.copy_and_resolve_references()
  with ft.unlocked():
    ft.data.source = config.eval.train_source
    for key in ('image_size', 'channels', 'mean', 'std'):
      ft.data[key] = config.data[key]
    ft.eval.train_source, ft.eval.test_source = config.eval.train_source, config.eval.test_source
    if random_init:  # The export's shape from random weights: the baseline.
      ft.model.encoder_from, ft.train.init_from = str(export_dir), None
    else:
      ft.train.init_from = str(export_dir)
  return ft


def finetune_probe(ft_config, run_dir: pathlib.Path) -> dict:
  """Trains (or resumes) the fine-tuning run in `run_dir`; its classifier's top-1."""
  from ssl_jax import train
  progress(f'fine-tuning (configs/finetune.py recipe, {ft_config.optim.name}) in {run_dir}; '
           'rerun the command to resume it')
  start = time.perf_counter()
  results = train.train_and_evaluate(ft_config, str(run_dir))
  if 'probe_top1' not in results:
    raise UserError(f'the fine-tuning run in {run_dir} stopped before its end (a signal?); '
                    'rerun the command to resume it')
  progress(f'fine-tuned top-1: {results["probe_top1"]:.4f}')
  return {'finetune_top1': results['probe_top1'], 'finetune_workdir': str(run_dir),
          'finetune_seconds': time.perf_counter() - start}


# ------------------------------------------------------------------------------
# Language models: the pretext loss on held-out text.
# ------------------------------------------------------------------------------
def _tokenizer_path(config, export_dir: pathlib.Path, workdir: pathlib.Path | None) -> str:
  """The run's tokenizer.json: next to the export, in the workdir, or config.data.tokenizer."""
  from ssl_jax.data.tokenizer import FILENAME
  for directory in (export_dir, workdir):
    if directory is not None and (directory / FILENAME).exists():
      return str(directory / FILENAME)
  if pathlib.Path(config.data.tokenizer).is_file():
    return config.data.tokenizer
  raise UserError(f'no {FILENAME} in {export_dir}' + (f' or {workdir}' if workdir else '')
                  + ': the tokenizer the model was trained with is needed to score text')


def language_probe(model, method, config, export_dir, workdir, mesh) -> dict:
  """val_loss, perplexity (and BERT's masked_accuracy) on the held-out split of the text."""
  import jax
  from flax import nnx

  from ssl_jax.data import text
  from ssl_jax.data.tokenizer import load_tokenizer
  from ssl_jax.eval.passes import device_pass
  config.data.tokenizer = _tokenizer_path(config, export_dir, workdir)
  vocab = load_tokenizer(config.data.tokenizer).vocab_size
  if vocab > config.model.vocab_size:  # Its ids past the embedding table would read NaN.
    raise UserError(f'the tokenizer {config.data.tokenizer} has {vocab} ids and the model '
                    f'{config.model.vocab_size} embeddings: not the tokenizer it was trained with')
  batches = text.eval_batches(config.data, batch_size=config.eval.batch_size,
                              process_index=jax.process_index(),
                              process_count=jax.process_count(), workdir=None)
  progress(f'held-out windows of {config.data.source} (val_fraction '
           f'{config.data.val_fraction}): {batches.num_examples}')
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, batch: method.eval_step(nnx.merge(graphdef, state), batch))
  totals: dict[str, list[float]] = {}
  for sums in device_pass(lambda b: step(state, b), batches, mesh):
    for name, (total, count) in jax.device_get(sums).items():
      running = totals.setdefault(name, [0.0, 0.0])
      running[0] += float(total)
      running[1] += float(count)
  if not totals or totals['loss'][1] == 0:
    raise UserError(f'{config.data.source}: no held-out tokens to score; raise '
                    '--config.data.val_fraction')
  results = {'val_loss': totals['loss'][0] / totals['loss'][1], 'tokens': int(totals['loss'][1]),
             'uniform_loss': math.log(config.data.vocab_size), 'source': config.data.source}
  results['perplexity'] = math.exp(min(results['val_loss'], 700.0))
  for name, (total, count) in totals.items():
    if name != 'loss':
      results[name] = total / max(count, 1e-9)
  progress(', '.join(f'{k} {v:.4f}' for k, v in results.items() if isinstance(v, float)))
  return results


# ------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------
def probe(export_dir: pathlib.Path, probe_config, *, workdir: pathlib.Path | None = None,
          random_init: bool = False) -> dict:
  """The results of `probe_config`'s protocol on the encoder exported in `export_dir`."""
  from flax import nnx

  from ssl_jax import checkpoint, methods, sharding
  from ssl_jax.config_blocks import mesh_config
  if not (export_dir / 'encoder').is_dir() or not (export_dir / 'config.json').exists():
    raise UserError(f'{export_dir} holds no export (encoder/ and config.json); train a run '
                    '(python -m ssl_jax.main ... --workdir=DIR) or convert weights first')
  start = time.perf_counter()
  config = run_config_for_probe(checkpoint.load_config(export_dir / 'config.json'), probe_config)
  mesh = sharding.make_mesh(mesh_config())
  encoder, method = methods.load_encoder(export_dir, mesh)
  if random_init:
    with sharding.activate(mesh, sharding.logical_rules(method.config.mesh)):
      encoder = method.build_encoder(nnx.Rngs(config.seed))
  progress(f'{config.method} encoder from {export_dir}'
           + (' (random init of its shape)' if random_init else ''))
  if 'held_out' in method.capabilities:
    results = language_probe(encoder, method, config, export_dir, workdir, mesh)
  elif 'features' in method.capabilities:
    ft_config = None
    if probe_config.protocol == 'finetune':  # Refuse a wrong recipe before any work.
      ft_config = finetune_run_config(config, probe_config, export_dir, random_init)
    results = {}
    if probe_config.eval.knn.enabled or probe_config.eval.linear_probe.enabled:
      results = image_probe(encoder, method, config, probe_config, mesh)
    elif ft_config is None:
      raise UserError('both eval.knn and eval.linear_probe are disabled: nothing to do')
    if ft_config is not None:
      run_dir = (workdir or export_dir) / ('finetune_random_init' if random_init else 'finetune')
      results.update(finetune_probe(ft_config, run_dir))
  else:
    raise UserError(f'a {config.method!r} export offers neither image features nor a '
                    'held-out text loss: nothing to probe')
  results.update(method=config.method, protocol=probe_config.protocol, random_init=random_init,
                 export=str(export_dir), seconds=time.perf_counter() - start)
  return results


def main(argv: list[str]) -> None:
  """Probes the export, writes probe.json, prints the JSON line last."""
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  if bool(_WORKDIR.value) == bool(_EXPORT.value):
    sys.exit(f'error: give exactly one of --workdir and --export\nUsage: {USAGE}')
  cli.quiet_logging()
  host_memory.keep_freed_memory()  # Before jax starts its backend.
  workdir = pathlib.Path(_WORKDIR.value) if _WORKDIR.value else None
  export_dir = workdir / 'export' if workdir else pathlib.Path(_EXPORT.value)
  try:
    results = probe(export_dir, _CONFIG.value, workdir=workdir, random_init=_RANDOM_INIT.value)
  except (UserError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')
  name = 'probe_random_init.json' if _RANDOM_INIT.value else 'probe.json'
  (workdir or export_dir).joinpath(name).write_text(json.dumps(results, indent=2) + '\n')
  print(json.dumps(results), flush=True)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with configs/probe.py as the default --config.

  Given as the flag's default, config_flags would apply --config.* overrides
  while the flag is defined, outside the parser's error messages.
  """
  if not any(arg == '--config' or arg.startswith('--config=') for arg in argv[1:]):
    argv = [argv[0], f'--config={_DEFAULT_CONFIG}', *argv[1:]]
  return cli.parse_config_flags(argv, USAGE)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
