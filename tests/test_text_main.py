"""GPT and BERT through the command line: :local learns, sampling, resume, init_from, errors."""

import json
import math
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from ssl_jax import checkpoint, sample
from ssl_jax.data import text_sources
from ssl_jax.errors import UserError
from ssl_jax.models.transformer import TransformerLM
from tests import runner

GPT_LOCAL, BERT_LOCAL = 'configs/gpt.py:local', 'configs/bert_mlm.py:local'
# A few-second GPT: the :local recipe with one narrow block.
TINY_GPT = ('--config.model.width=32', '--config.model.depth=1', '--config.model.mlp_dim=64',
            '--config.data.batch_size=8', '--config.optim.warmup_steps=2',
            '--config.train.log_every=1', '--config.train.eval_every=0')


def train_records(workdir) -> list[dict]:
  return [r for r in runner.read_metrics(workdir) if 'loss' in r]


def unigram_entropy(workdir, data) -> float:
  """The entropy of the run's training tokens (what a context-free model scores)."""
  corpus = text_sources.tokenized_text(data, str(workdir))
  return text_sources.unigram_entropy(corpus.train, corpus.tokenizer.vocab_size)


def check_text_run(workdir, result, steps) -> tuple[dict, dict]:
  """What every language run must show: progress in tokens, FLOPs, a val loss; its config."""
  assert result.returncode == 0, result.stdout + result.stderr
  records = train_records(workdir)
  assert records[-1]['step'] == steps
  for key in ('tokens_per_sec', 'tflops_per_sec_per_device', 'grad_norm'):
    assert key in records[-1], records[-1]
  assert 'tokens/s' in result.stdout and 'GFLOP/s/device' in result.stdout
  final = [r for r in runner.read_metrics(workdir) if 'val_loss' in r][-1]
  assert 'held-out split at step' in result.stdout
  config = json.loads((workdir / 'config.json').read_text())
  assert (workdir / 'tokenizer.json').exists() and list((workdir / 'tokens').glob('*.npy'))
  # The export is the whole language model, with the last checkpoint's weights.
  encoder, _ = checkpoint.load_encoder(workdir / 'export')
  assert isinstance(encoder, TransformerLM)
  saved = runner.restore_state(workdir, steps)
  exported = runner.flat_dict(nnx.to_pure_dict(nnx.state(encoder)))
  assert len(exported) == len([k for k in saved if k.startswith('params/')]) > 10
  for key, value in exported.items():
    np.testing.assert_array_equal(value, saved[f'params/{key}/value'], err_msg=key)
  return final, config


def data_config(config: dict) -> ml_collections.ConfigDict:
  """config.data of a saved config.json."""
  return ml_collections.ConfigDict(config['data'])


# ---------------------------------------------------------------- GPT.

def test_gpt_local_learns_and_samples(tmp_path):
  """:local shortened to 120 steps: the val loss falls far below the unigram entropy."""
  result = runner.run_main(tmp_path, '--config.train.steps=120', '--config.train.eval_every=0',
                           config=GPT_LOCAL, fast_compile=False)
  final, config = check_text_run(tmp_path, result, 120)
  assert config['model']['vocab_size'] == 1024  # From the tokenizer, recorded.
  entropy = unigram_entropy(tmp_path, data_config(config))  # 5.95 nats.
  records = train_records(tmp_path)
  assert records[0]['loss'] > math.log(1024) - 0.2  # Starts near uniform.
  assert final['val_loss'] < entropy - 1.0, (final, entropy)  # About 4.6 at 120 steps.

  # The sampler's command line: the same seed gives the same text.
  def sample_cli(*flags):
    return subprocess.run([sys.executable, '-m', 'ssl_jax.sample', *flags], cwd=runner.REPO,
                          env=runner.child_env(), capture_output=True, text=True, timeout=300)
  first = sample_cli(f'--workdir={tmp_path}', '--prompt=The ', '--max_new_tokens=40', '--seed=3')
  again = sample_cli(f'--workdir={tmp_path}', '--prompt=The ', '--max_new_tokens=40', '--seed=3')
  assert first.returncode == 0, first.stderr
  assert first.stdout == again.stdout and first.stdout.startswith('The ')
  assert len(first.stdout) > 60  # 40 BPE tokens of English.
  missing = sample_cli(f'--workdir={tmp_path / "nothing"}')
  assert missing.returncode != 0 and 'Traceback' not in missing.stderr
  assert 'holds no trained run (no config.json)' in missing.stderr

  # Past the context of 128 the window slides; its first window is one plain generate call.
  model, _, source = sample.load_model(tmp_path)
  assert source == 'checkpoint step 120'
  prompts, key = np.array([[5, 6]], np.int32), jax.random.key(0)
  def continuation(count, key=key):
    return sample.continue_tokens(model, prompts, key, max_new_tokens=count, temperature=1.0,
                                  top_k=None)
  long, short = continuation(150), continuation(126)
  assert long.shape == (1, 150)
  np.testing.assert_array_equal(long[:, :126], short)
  assert (continuation(126, jax.random.key(1)) != short).any()  # Another seed, another text.
  with pytest.raises(UserError, match=r"the prompt is \d+ tokens; the model's context of 128 "
                                      'tokens leaves room to continue at most 127'):
    sample.sample(tmp_path, 'word ' * 200, max_new_tokens=5, temperature=1.0, top_k=0, seed=0)


# ---------------------------------------------------------------- BERT.

def test_bert_local_learns(tmp_path):
  """:local shortened to 200 steps: masked tokens predicted better than from frequencies.

  The ~2,300 masked val tokens put 3 standard deviations of the accuracy at
  0.027; the full run (test_full_local_runs) gets further.
  """
  result = runner.run_main(tmp_path, '--config.train.steps=200', '--config.train.eval_every=0',
                           config=BERT_LOCAL, fast_compile=False)
  final, config = check_text_run(tmp_path, result, 200)
  records = train_records(tmp_path)
  assert 'masked_accuracy' in records[-1] and records[-1]['predictions_dropped'] == 0
  corpus = text_sources.tokenized_text(data_config(config), str(tmp_path))
  ordinary = corpus.val[~np.isin(corpus.val, corpus.tokenizer.special_ids)]
  baseline = np.bincount(ordinary).max() / len(ordinary)  # 0.24: '-' of the ASCII tables.
  assert f'masked accuracy {baseline:.3f}' in result.stdout  # The start-up log says so.
  assert final['val_masked_accuracy'] > baseline + 0.03, (final, baseline)  # 0.29 vs 0.24.
  unigram = text_sources.unigram_cross_entropy(corpus.train, ordinary, corpus.tokenizer.vocab_size)
  assert final['val_loss'] < unigram - 0.4, (final, unigram)  # 4.3 vs 4.95 nats.
  with pytest.raises(UserError, match="holds a 'bert' run; sampling needs a causal model"):
    sample.sample(tmp_path, 'The', max_new_tokens=5, temperature=1.0, top_k=0, seed=0)


# ---------------------------------------------------------------- resume and init_from.

def test_text_run_resumes_exactly_and_init_from_loads_weights(tmp_path):
  straight, resumed, started = tmp_path / 'straight', tmp_path / 'resumed', tmp_path / 'started'
  # A constant lr: a cosine's shape would depend on train.steps, which the rerun changes.
  constant = ('--config.optim.schedule=constant', '--config.train.checkpoint_every=5')
  done = runner.run_main(straight, *TINY_GPT, *constant, '--config.train.steps=12',
                         config=GPT_LOCAL)
  assert done.returncode == 0, done.stdout + done.stderr
  for steps in (5, 12):  # 5 steps, then the same command asked for 12: resumes at 5.
    part = runner.run_main(resumed, *TINY_GPT, *constant, f'--config.train.steps={steps}',
                           config=GPT_LOCAL)
    assert part.returncode == 0, part.stdout + part.stderr
  assert 'Resumed from' in part.stdout
  # Same data position, same losses at every step, same weights at the end.
  assert [(r['step'], r['loss']) for r in train_records(resumed)] == [
      (r['step'], r['loss']) for r in train_records(straight)]
  want, got = runner.restore_state(straight, 12), runner.restore_state(resumed, 12)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)

  # A fresh run from the straight run's weights: with lr 0 its one step keeps them.
  frozen = ('--config.train.steps=1', '--config.optim.schedule=constant', '--config.optim.lr=0')
  fresh = runner.run_main(started, *TINY_GPT, *frozen, f'--config.train.init_from={straight}',
                          config=GPT_LOCAL)
  assert fresh.returncode == 0, fresh.stdout + fresh.stderr
  assert f'Initialised the weights from checkpoint {straight}/checkpoints/12' in fresh.stdout
  loaded = runner.restore_state(started, 1)
  params = [k for k in want if k.startswith('params/')]
  for key in params:
    np.testing.assert_array_equal(loaded[key], want[key], err_msg=key)
  # Its first loss is the trained weights' on the first batch: 6.50 against 6.93 at init.
  assert loaded['step'] == 1
  assert train_records(started)[0]['loss'] < train_records(straight)[0]['loss'] - 0.3
  # Shapes that do not fit: a clear error, and no checkpoint is written.
  wrong = runner.run_main(tmp_path / 'wrong', *TINY_GPT, *frozen, '--config.model.mlp_dim=32',
                          f'--config.train.init_from={straight}', config=GPT_LOCAL)
  assert wrong.returncode != 0 and 'Traceback' not in wrong.stderr
  assert 'blocks/0/mlp/fc1/kernel: saved (32, 64), this model (32, 32)' in wrong.stderr


# ---------------------------------------------------------------- paper recipes without data.

@pytest.mark.parametrize('config,name', [('configs/gpt.py', 'c4/en'),
                                         ('configs/bert_mlm.py', 'wikipedia/20230601.en')])
def test_paper_recipes_fail_fast_without_their_data(tmp_path, config, name):
  start = time.time()
  result = subprocess.run(runner.main_command(tmp_path / 'w', f'--config.data.tfds_dir={tmp_path}',
                                              config=config),
                          cwd=runner.REPO, env=runner.child_env(), capture_output=True, text=True,
                          timeout=120)
  assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr
  assert f"dataset '{name}' is not prepared in data dir {tmp_path}" in result.stderr
  assert 'text:PATH' in result.stderr and time.time() - start < 60
  assert not (tmp_path / 'w' / 'checkpoints').exists()


@pytest.mark.slow
@pytest.mark.parametrize('config', [GPT_LOCAL, BERT_LOCAL])
def test_full_local_runs(tmp_path, config):
  """The :local jobs exactly as the README runs them (a few minutes each on 2 cores)."""
  start = time.time()
  result = runner.run_main(tmp_path, config=config, fast_compile=False)
  steps = json.loads((tmp_path / 'config.json').read_text())['train']['steps']
  final, saved = check_text_run(tmp_path, result, steps)
  entropy = unigram_entropy(tmp_path, data_config(saved))
  if config == GPT_LOCAL:
    assert final['val_loss'] < entropy - 1.8, (final, entropy)  # 3.95 vs 5.95 nats.
  else:
    assert final['val_masked_accuracy'] > 0.30, final  # 0.33; the most frequent token: 0.24.
  print(f'\n{config} wall time {time.time() - start:.0f} s; {final}; unigram entropy {entropy}')
