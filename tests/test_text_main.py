"""GPT and BERT on the command line: runs, sampling, resume, init_from, errors; :local learns."""

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

from ssl_jax import methods, sample
from ssl_jax.data import text_sources
from ssl_jax.errors import UserError
from ssl_jax.models.lm import TransformerLM
from tests import runner

GPT_LOCAL, BERT_LOCAL = 'configs/gpt.py:local', 'configs/bert_mlm.py:local'
# A few-second model: the :local recipe with one narrow block.
TINY = ('--config.model.width=32', '--config.model.depth=1', '--config.model.mlp_dim=64',
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
  encoder, _ = methods.load_encoder(workdir / 'export')
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

@pytest.mark.slow
def test_gpt_local_learns(tmp_path):
  """The :local job as the README runs it: the val loss falls far below the unigram entropy."""
  start = time.time()
  result = runner.run_main(tmp_path, config=GPT_LOCAL, fast_compile=False)
  final, config = check_text_run(tmp_path, result, 400)
  assert config['model']['vocab_size'] == 1024  # From the tokenizer, recorded.
  entropy = unigram_entropy(tmp_path, data_config(config))  # 5.95 nats.
  records = train_records(tmp_path)
  assert records[0]['loss'] > math.log(1024) - 0.2  # Starts near uniform.
  assert final['val_loss'] < entropy - 1.8, (final, entropy)  # 3.95 nats.
  check_sampling(tmp_path, 400)
  print(f'\nGPT :local wall time {time.time() - start:.0f} s; {final}; unigram entropy {entropy}')


def check_sampling(workdir, step: int) -> None:
  """The sampler's command line and its sliding window, on a trained GPT run in `workdir`."""
  def sample_cli(*flags):
    return subprocess.run([sys.executable, '-m', 'ssl_jax.sample', *flags], cwd=runner.REPO,
                          env=runner.child_env(), capture_output=True, text=True, timeout=300)
  first = sample_cli(f'--workdir={workdir}', '--prompt=The ', '--max_new_tokens=40', '--seed=3')
  assert first.returncode == 0, first.stderr
  assert first.stdout.startswith('The ') and len(first.stdout) > 40  # 40 BPE tokens.
  missing = sample_cli(f'--workdir={workdir / "nothing"}')
  assert missing.returncode != 0 and 'Traceback' not in missing.stderr
  assert 'holds no trained run (no config.json)' in missing.stderr
  # The same seed gives the same text (in process: the command line calls `sample`).
  again = [sample.sample(workdir, 'The ', max_new_tokens=40, temperature=0.8, top_k=200, seed=3)
           for _ in range(2)]
  assert again[0] == again[1] and again[0][0] + '\n' == first.stdout

  # Past the context of 128 the window slides; its first window is one plain generate call.
  model, _, source = sample.load_model(workdir)
  assert source == f'checkpoint step {step}'
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
    sample.sample(workdir, 'word ' * 200, max_new_tokens=5, temperature=1.0, top_k=0, seed=0)


# ---------------------------------------------------------------- BERT.

def test_bert_runs_end_to_end(tmp_path):
  """A few steps of a narrow BERT through the command line: every output, a held-out eval."""
  result = runner.run_main(tmp_path, *TINY, '--config.train.steps=6', config=BERT_LOCAL)
  final, _ = check_text_run(tmp_path, result, 6)
  assert 0 <= final['val_masked_accuracy'] <= 1 and final['val_loss'] > 0
  assert 'masked_accuracy' in train_records(tmp_path)[-1]
  assert 'always guessing the most frequent val token scores masked accuracy' in result.stdout
  with pytest.raises(UserError, match="holds a 'bert' run; sampling needs a causal model"):
    sample.sample(tmp_path, 'The', max_new_tokens=5, temperature=1.0, top_k=0, seed=0)


@pytest.mark.slow
def test_bert_local_learns(tmp_path):
  """The :local job as the README runs it: masked tokens predicted better than from frequencies.

  The ~2,300 masked val tokens put 3 standard deviations of the accuracy at 0.03.
  """
  start = time.time()
  result = runner.run_main(tmp_path, config=BERT_LOCAL, fast_compile=False)
  final, config = check_text_run(tmp_path, result, 400)
  records = train_records(tmp_path)
  assert records[-1]['predictions_dropped'] == 0
  corpus = text_sources.tokenized_text(data_config(config), str(tmp_path))
  ordinary = corpus.val[~np.isin(corpus.val, corpus.tokenizer.special_ids)]
  baseline = np.bincount(ordinary).max() / len(ordinary)  # 0.237: '-' of the ASCII tables.
  assert f'masked accuracy {baseline:.3f}' in result.stdout  # The start-up log says so.
  assert final['val_masked_accuracy'] > baseline + 0.05, (final, baseline)  # 0.326.
  unigram = text_sources.unigram_cross_entropy(corpus.train, ordinary, corpus.tokenizer.vocab_size)
  assert final['val_loss'] < unigram - 0.6, (final, unigram)  # 4.11 vs 4.94 nats.
  print(f'\nBERT :local wall time {time.time() - start:.0f} s; {final}; unigram {unigram}')


# ---------------------------------------------------------------- resume and init_from.

@pytest.mark.slow  # 60 s; test_resume.py covers exact resumption in the default run.
def test_text_run_resumes_exactly_and_init_from_loads_weights(tmp_path):
  straight, resumed, started = tmp_path / 'straight', tmp_path / 'resumed', tmp_path / 'started'
  # A constant lr: a cosine's shape would depend on train.steps, which the rerun changes.
  constant = ('--config.optim.schedule=constant', '--config.train.checkpoint_every=5')
  done = runner.run_main(straight, *TINY, *constant, '--config.train.steps=12',
                         config=GPT_LOCAL)
  assert done.returncode == 0, done.stdout + done.stderr
  for steps in (5, 12):  # 5 steps, then the same command asked for 12: resumes at 5.
    part = runner.run_main(resumed, *TINY, *constant, f'--config.train.steps={steps}',
                           config=GPT_LOCAL)
    assert part.returncode == 0, part.stdout + part.stderr
  assert 'Resumed from' in part.stdout
  # Same data position, same losses at every step, same weights at the end.
  assert [(r['step'], r['loss']) for r in train_records(resumed)] == [
      (r['step'], r['loss']) for r in train_records(straight)]
  want, got = runner.restore_state(straight, 12), runner.restore_state(resumed, 12)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  check_sampling(straight, 12)

  # A fresh run from the straight run's weights: with lr 0 its one step keeps them.
  frozen = ('--config.train.steps=1', '--config.optim.schedule=constant', '--config.optim.lr=0')
  fresh = runner.run_main(started, *TINY, *frozen, f'--config.train.init_from={straight}',
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
  wrong = runner.run_main(tmp_path / 'wrong', *TINY, *frozen, '--config.model.mlp_dim=32',
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
