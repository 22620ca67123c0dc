"""Tokenizers: round trips, deterministic training, save/reload, user files, workdir reuse."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from ssl_jax.data import text_sources, tokenizer
from ssl_jax.errors import DataError
from tests.text_fixtures import text_config

SAMPLES = ['def f(x):\n\treturn x ** 2  # square\n', 'Ünïcödé — “quotes” ✓ 猫 🙂',
           '  leading and trailing spaces  ', '\n\n\n', '<|endoftext|> is special']


@pytest.fixture(scope='module')
def pydoc_train():
  """The training split of the pydoc text (the held-out 10% never trains a tokenizer)."""
  train, _ = text_sources.split_documents(text_sources.read_documents('pydoc'), 0.1)
  return train


@pytest.fixture(scope='module')
def bpe(pydoc_train):
  return tokenizer.train_tokenizer('bpe', pydoc_train, vocab_size=1000, objective='causal_lm')


def test_byte_level_bpe_round_trips_any_text(bpe):
  assert bpe.kind == 'bpe' and bpe.vocab_size == 1000
  assert bpe.special_ids == (0,) and bpe.eot_id == bpe.pad_id == 0 and bpe.mask_id is None
  for text in SAMPLES:
    assert bpe.decode(bpe.encode(text)) == text
  assert bpe.encode('<|endoftext|>') == [bpe.eot_id]
  # Merges compress: common Python words take one token each.
  assert len(bpe.encode(' return')) == 1 and len(bpe.encode(' the')) == 1
  assert [len(ids) for ids in bpe.encode_batch(['a b', ' return'])] == [2, 1]


def test_char_tokenizer_round_trips_and_maps_unseen_characters_to_unk():
  char = tokenizer.train_tokenizer('char', ['hello', 'world\n'], vocab_size=0,
                                   objective='causal_lm')
  # Special tokens first, then the sorted alphabet.
  assert char.vocab_size == 2 + 8 and char.decode(range(2, 10)) == '\ndehlorw'
  assert char.eot_id == 0 and char.unk_id == 1 and char.special_ids == (0, 1)
  assert char.decode(char.encode('hello\nworld')) == 'hello\nworld'
  assert char.encode('hex!') == [char.encode('h')[0], char.encode('e')[0], 1, 1]
  masked = tokenizer.train_tokenizer('char', ['ab'], vocab_size=0, objective='masked_lm')
  assert (masked.pad_id, masked.unk_id, masked.cls_id, masked.sep_id, masked.mask_id) == (
      0, 1, 2, 3, 4)
  assert masked.encode('ba') == [6, 5]


def test_wordpiece_lowercases_strips_accents_and_splits_words(pydoc_train):
  wordpiece = tokenizer.train_tokenizer('wordpiece', pydoc_train, vocab_size=800,
                                        objective='masked_lm')
  assert wordpiece.kind == 'wordpiece' and wordpiece.vocab_size == 800
  assert wordpiece.special_ids == (0, 1, 2, 3, 4) and wordpiece.mask_id == 4
  assert wordpiece.decode(wordpiece.encode('Hello WORLD, Naïve Café!')) == \
      'hello world, naive cafe!'
  assert wordpiece.encode('The [MASK] x') == (
      wordpiece.encode('the') + [wordpiece.mask_id] + wordpiece.encode('x'))
  assert wordpiece.encode('猫') == [wordpiece.unk_id]  # Never seen in training.


def test_training_is_deterministic_to_the_byte(pydoc_train):
  # Without numbering the `##` continuations up front, HF's WordPiece trainer
  # gives a different vocabulary on most runs at this size (ties in merges).
  for kind in ('wordpiece', 'bpe'):
    first, second = (tokenizer.train_tokenizer(kind, pydoc_train, vocab_size=4096,
                                               objective='masked_lm').to_json()
                     for _ in range(2))
    assert first == second, kind
  other = tokenizer.train_tokenizer('bpe', pydoc_train[:-1], vocab_size=4096,
                                    objective='masked_lm').to_json()
  assert other != first  # Not trivially equal: other text, other merges.


@pytest.mark.parametrize('kind', ['bpe', 'wordpiece', 'char'])
def test_save_and_reload_give_the_same_tokenizer(tmp_path, pydoc_train, kind):
  trained = tokenizer.train_tokenizer(kind, pydoc_train[:20], vocab_size=600,
                                      objective='masked_lm')
  trained.save(tmp_path / 'tokenizer.json')
  loaded = tokenizer.load_tokenizer(tmp_path / 'tokenizer.json')
  assert type(loaded) is type(trained) and loaded.kind == kind
  assert loaded.to_json() == trained.to_json() and loaded.vocab_size == trained.vocab_size
  assert loaded.special_ids == trained.special_ids and loaded.mask_id == trained.mask_id
  for text in SAMPLES[:3]:
    assert loaded.encode(text) == trained.encode(text)


def test_workdir_tokenizer_is_reused_not_retrained(tmp_path):
  data = text_config(tokenizer='bpe', vocab_size=300)
  made = tokenizer.tokenizer_for_run(data, tmp_path, lambda: ['abc abd abe ' * 20])
  assert (tmp_path / 'tokenizer.json').read_text() == made.to_json()

  def must_not_train():
    raise AssertionError('retrained although WORKDIR/tokenizer.json exists')

  # Another vocab_size on resume: the saved tokenizer still wins.
  again = tokenizer.tokenizer_for_run(text_config(tokenizer='bpe', vocab_size=999), tmp_path,
                                      must_not_train)
  assert again.to_json() == made.to_json()
  with pytest.raises(DataError, match=f'{tmp_path}/tokenizer.json holds a bpe tokenizer but '
                                      "config.data.tokenizer='char'"):
    tokenizer.tokenizer_for_run(text_config(tokenizer='char'), tmp_path, must_not_train)


def _user_wordpiece_file(path):
  """A bert-base-uncased-like tokenizer.json that pads, truncates and adds [CLS]/[SEP]."""
  vocab = {t: i for i, t in enumerate(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'hello',
                                       'world', '##s'])}
  user = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token='[UNK]'))
  user.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  user.add_special_tokens(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'])
  user.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', special_tokens=[('[CLS]', 2), ('[SEP]', 3)])
  user.enable_padding(pad_id=0, length=16)
  user.enable_truncation(max_length=16)
  user.save(str(path))
  assert user.encode('hello').ids[:3] == [2, 5, 3]  # What a naive load would give.


def test_user_tokenizer_file_is_loaded_as_is_and_copied_to_the_workdir(tmp_path):
  _user_wordpiece_file(tmp_path / 'user.json')
  data = text_config(tokenizer=str(tmp_path / 'user.json'), objective='masked_lm')
  workdir = tmp_path / 'run'
  loaded = tokenizer.tokenizer_for_run(data, workdir, lambda: pytest.fail('trained'))
  assert loaded.kind == 'wordpiece' and loaded.vocab_size == 8
  assert (loaded.pad_id, loaded.cls_id, loaded.sep_id, loaded.mask_id) == (0, 2, 3, 4)
  # No [CLS]/[SEP], padding or truncation: the pipeline packs sequences itself.
  assert loaded.encode('hello worlds bye') == [5, 6, 7, 1]
  assert tokenizer.load_tokenizer(workdir / 'tokenizer.json').encode('hello') == [5]
  # A workdir started with another tokenizer file refuses to mix ids.
  _user_wordpiece_file(tmp_path / 'user.json')
  vocab = json.loads((tmp_path / 'user.json').read_text())
  vocab['model']['vocab']['##es'] = 8
  (tmp_path / 'other.json').write_text(json.dumps(vocab))
  with pytest.raises(DataError, match='differs from config.data.tokenizer=.*other.json'):
    tokenizer.tokenizer_for_run(text_config(tokenizer=str(tmp_path / 'other.json'),
                                            objective='masked_lm'), workdir, list)


def test_roberta_style_names_and_missing_special_tokens(tmp_path):
  roberta = tokenizers.Tokenizer(models.BPE())
  roberta.add_special_tokens(['<s>', '<pad>', '</s>', '<unk>', '<mask>'])
  loaded = tokenizer.HuggingFaceTokenizer(roberta)
  assert (loaded.cls_id, loaded.pad_id, loaded.sep_id, loaded.eot_id, loaded.mask_id) == (
      0, 1, 2, 2, 4)
  tokenizer.check_special_tokens(loaded, 'masked_lm', 'roberta')  # No error.
  plain = tokenizers.Tokenizer(models.BPE())
  plain.add_special_tokens(['[UNK]'])
  plain.save(str(tmp_path / 'plain.json'))
  with pytest.raises(DataError, match=r"plain.json has no special token \['<\|endoftext\|>'\]"):
    tokenizer.tokenizer_for_run(text_config(tokenizer=str(tmp_path / 'plain.json')), None, list)


def test_bad_tokenizer_files_and_names(tmp_path):
  with pytest.raises(DataError, match=f'Cannot read tokenizer file .*{tmp_path}/none.json'):
    tokenizer.load_tokenizer(tmp_path / 'none.json')
  (tmp_path / 'bad.json').write_text('{not json')
  with pytest.raises(DataError, match='bad.json.* is not JSON'):
    tokenizer.load_tokenizer(tmp_path / 'bad.json')
  with pytest.raises(DataError, match=r"config.data.tokenizer='sentencepiece'; expected one of"):
    tokenizer.train_tokenizer('sentencepiece', ['x'], vocab_size=10, objective='causal_lm')
  with pytest.raises(DataError, match=r"config.data.objective='mlm'"):
    tokenizer.special_tokens_for('mlm')


def test_tokenizer_trains_on_the_training_split_only(tmp_path):
  # 'Z' occurs only in the last 10% of the file: the held-out split.
  path = tmp_path / 'book.txt'
  path.write_text('abc abc abc\n' * 90 + 'Zab\n' * 30)  # 1,080 + 120 characters
  data = text_config(source=f'text:{path}', tokenizer='char')
  text = text_sources.tokenized_text(data, tmp_path / 'run')
  assert 'Z' not in text.tokenizer.decode(range(text.tokenizer.vocab_size))
  assert text.tokenizer.decode(text.train[:12]) == 'abc abc abc\n'
  assert (text.val == text.tokenizer.unk_id).sum() == 30
  assert text.counts == {'train_docs': 1, 'val_docs': 1, 'train_chars': 1080, 'val_chars': 120}
  assert np.array_equal(text.val[-1:], [text.tokenizer.eot_id])
