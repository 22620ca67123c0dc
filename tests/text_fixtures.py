"""Shared helpers of the text-data tests: a small `config.data` for text runs."""

import ml_collections
import pytest


def text_config(**overrides) -> ml_collections.ConfigDict:
  """A CPU-sized text `config.data` with the keys the text pipeline reads."""
  data = dict(source='pydoc', tfds_dir=None, batch_size=16, objective='causal_lm',
              tokenizer='char', vocab_size=512, seq_len=64, val_fraction=0.1, mask_prob=0.15,
              num_workers=0, prefetch=0)
  data.update(overrides)
  return ml_collections.ConfigDict(data)


CHAR = dict(tokenizer='char', objective='causal_lm')
WORDPIECE = dict(tokenizer='wordpiece', vocab_size=1000, objective='masked_lm')


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  """One workdir per tokenizer kind: each is trained once, then reused from tokenizer.json."""
  dirs = {}

  def workdir(data) -> str:
    if data.tokenizer not in dirs:
      dirs[data.tokenizer] = str(tmp_path_factory.mktemp(data.tokenizer))
    return dirs[data.tokenizer]

  return workdir
