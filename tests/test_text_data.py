"""Text pipeline: split, packing, BERT masking statistics, exact resume, process shares, errors."""

import math
import time

import numpy as np
import pytest

from ssl_jax import checkpoint
from ssl_jax.data import masking, text, text_sources, tfds_source
from ssl_jax.errors import DataError
from tests.data_fixtures import assert_batches_equal, take
from tests.text_fixtures import CHAR, WORDPIECE, text_config


def within(observed: float, expected: float, count: int, sigmas: float = 5.0) -> bool:
  """Whether a binomial fraction over `count` trials lies within `sigmas` std of `expected`."""
  return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / count)


# ---------------------------------------------------------------- corpus ---


def test_split_holds_out_the_last_characters_from_a_line_start():
  documents = ['a' * 50, 'line one\nline two\n' + 'x' * 14, 'tail' * 5]  # 50 + 32 + 20 chars
  # 30% of 102 characters: the cut at 71 moves back to the start of its line, 68.
  train, val = text_sources.split_documents(documents, 0.3)
  assert train == ['a' * 50, 'line one\nline two\n'] and val == ['x' * 14, 'tail' * 5]
  # Without a line break before the cut, the cut is exact.
  assert text_sources.split_documents(['abcdefghij'], 0.2) == (['abcdefgh'], ['ij'])
  docs = text_sources.read_documents('pydoc')
  train, val = text_sources.split_documents(docs, 0.1)
  assert len(docs) == 79 and ''.join(train) + ''.join(val) == ''.join(docs)
  assert abs(sum(map(len, val)) / sum(map(len, docs)) - 0.1) < 0.001


def test_unigram_entropy_against_hand_computation():
  tokens = np.array([0, 0, 1, 2])
  assert text_sources.unigram_entropy(tokens, 5) == pytest.approx(
      -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
  # Add-one smoothing over 4 ids: counts (2, 1, 0, 0) + 1 = (3, 2, 1, 1), total 7.
  assert text_sources.unigram_cross_entropy(tokens[:3], np.array([0, 3]), 4) == pytest.approx(
      -(math.log(3 / 7) + math.log(1 / 7)) / 2)


def test_documents_are_separated_and_cached_in_the_workdir(run_dir, monkeypatch):
  data = text_config(**CHAR)
  workdir = run_dir(data)
  corpus = text_sources.tokenized_text(data, workdir)
  tokenizer = corpus.tokenizer
  train, val = text_sources.split_documents(text_sources.read_documents('pydoc'), 0.1)
  # Every document is followed by <|endoftext|>, the only special token in the stream.
  assert corpus.counts['train_docs'] == len(train) == (corpus.train == tokenizer.eot_id).sum()
  assert corpus.train[-1] == corpus.val[-1] == tokenizer.eot_id
  pieces = np.split(corpus.train, np.flatnonzero(corpus.train == tokenizer.eot_id) + 1)[:-1]
  assert [tokenizer.decode(p[:-1]) for p in pieces] == train
  assert np.array_equal(corpus.val, np.concatenate(
      [tokenizer.encode(doc) + [tokenizer.eot_id] for doc in val]))
  # Cached as .npy: a fresh process state reloads without reading the source.
  text_sources._MEMORY.clear()
  monkeypatch.setattr(text_sources, 'Documents', lambda *a: pytest.fail('re-read'))
  again = text_sources.tokenized_text(data, workdir)
  assert np.array_equal(again.train, corpus.train) and again.counts == corpus.counts


# --------------------------------------------------------------- packing ---


def occurrences(stream: np.ndarray, row: np.ndarray) -> list[int]:
  """Every position where `row` occurs in `stream` (compared as int32)."""
  haystack, needle = np.asarray(stream, np.int32).tobytes(), row.astype(np.int32).tobytes()
  found, at = [], haystack.find(needle)
  while at >= 0:
    if at % 4 == 0:
      found.append(at // 4)
    at = haystack.find(needle, at + 1)
  return found


def test_each_train_epoch_tiles_the_train_stream_at_a_new_offset(run_dir):
  data = text_config(seq_len=256, batch_size=16, **CHAR)
  workdir = run_dir(data)
  corpus = text_sources.tokenized_text(data, workdir)
  stream, num_windows, summary = text.train_dataset(data, seed=0, workdir=workdir)
  assert num_windows == (len(corpus.train) - 256 + 1) // 255 == 1640
  assert f'1,640 train / {math.ceil((len(corpus.val) - 1) / 255)} val windows of 256' in summary
  batches = take(iter(stream), math.ceil(2 * num_windows / 16))
  tokens = np.concatenate([b['tokens'] for b in batches])
  weights = np.concatenate([b['weights'] for b in batches])
  assert tokens.dtype == np.int32 and weights.dtype == np.float32
  assert (weights[:, 0] == 0).all() and (weights[:, 1:] == 1).all()
  train = np.asarray(corpus.train, np.int32)  # The uint16 file, as the windows' dtype.
  offsets = []
  for epoch in (0, 1):
    rows = tokens[epoch * num_windows:(epoch + 1) * num_windows]
    # Windows are cut from the train stream, so none reaches into validation;
    # all start at one offset modulo the stride (text may repeat: any occurrence).
    residues = set.intersection(*({c % 255 for c in occurrences(train, row)}
                                  for row in rows[:20]))
    assert len(residues) == 1
    offset = residues.pop()
    tiles = {train[i * 255 + offset:i * 255 + offset + 256].tobytes()
             for i in range(num_windows)}
    assert {row.tobytes() for row in rows} == tiles  # every slot once, consecutive overlap 1
    offsets.append(offset)
  assert offsets[0] != offsets[1]


@pytest.mark.parametrize('process_count', [1, 3])
def test_causal_eval_windows_cover_the_validation_stream_once(run_dir, process_count):
  data = text_config(**CHAR)
  workdir = run_dir(data)
  val = text_sources.tokenized_text(data, workdir).val
  runs = [text.eval_batches(data, batch_size=48, process_index=p, process_count=process_count,
                            workdir=workdir) for p in range(process_count)]
  num_windows = math.ceil((len(val) - 1) / 63)
  local_batch = 48 // process_count
  assert {len(r) for r in runs} == {math.ceil(math.ceil(num_windows / process_count) / local_batch)}
  shares = [(np.concatenate([b['tokens'] for b in r]), np.concatenate([b['weights'] for b in r]))
            for r in map(list, runs)]
  # Interleave the shares back into window order; padding windows come last.
  tokens = np.zeros((num_windows, 64), np.int32)
  weights = np.zeros((num_windows, 64), np.float32)
  for p, (share_tokens, share_weights) in enumerate(shares):
    real = len(range(p, num_windows, process_count))
    tokens[p::process_count], weights[p::process_count] = share_tokens[:real], share_weights[:real]
    assert (share_weights[real:] == 0).all()
  assert runs[0].num_examples == num_windows and weights.sum() == len(val) - 1
  rebuilt = np.concatenate([tokens[0]] + [row[1:] for row in tokens[1:]])
  assert np.array_equal(rebuilt[:len(val)], val)  # each next-token pair once, in order
  tail = len(val) - 63 * (num_windows - 1)  # real tokens of the last, padded window
  assert weights[-1].sum() == tail - 1 and not weights[-1, tail:].any()
  assert (tokens[-1, tail:] == text_sources.tokenized_text(data, workdir).tokenizer.pad_id).all()


def test_masked_eval_windows_are_cls_chunk_sep_and_fixed(run_dir):
  data = text_config(**WORDPIECE)
  workdir = run_dir(data)
  corpus = text_sources.tokenized_text(data, workdir)
  tok = corpus.tokenizer
  first, second = (list(text.eval_batches(data, batch_size=32, workdir=workdir))
                   for _ in range(2))
  assert_batches_equal(first, second)  # the same masking at every eval
  batch = {k: np.concatenate([b[k] for b in first]) for k in first[0]}
  assert batch['token_types'].dtype == np.int32 and not batch['token_types'].any()
  lengths = batch['key_mask'].sum(1)
  real = lengths > 2
  chunks = [row[1:n - 1] for row, n in zip(batch['labels'][real], lengths[real], strict=True)]
  assert np.array_equal(np.concatenate(chunks), corpus.val)  # every token once, in order
  assert (batch['labels'][:, 0] == tok.cls_id).all()
  assert (batch['labels'][np.arange(len(lengths)), lengths - 1] == tok.sep_id).all()
  assert (batch['labels'][~batch['key_mask']] == tok.pad_id).all()
  assert real.sum() == math.ceil(len(corpus.val) / 62) and (lengths[~real] == 2).all()
  assert not batch['weights'][~batch['key_mask']].any()


# --------------------------------------------------------------- masking ---


def test_random_ordinary_ids_are_uniform_and_never_special():
  ids = masking.random_ordinary_ids(np.random.default_rng(0), 60_000, [0, 3, 4, 9], 10)
  counts = np.bincount(ids, minlength=10)
  assert (counts[[0, 3, 4, 9]] == 0).all()
  assert all(within(c / 60_000, 1 / 6, 60_000) for c in counts[[1, 2, 5, 6, 7, 8]])


def check_masking_statistics(inputs, labels, weights, eligible, mask_id, special_ids, vocab):
  """The 15% / 80-10-10 fractions within 5 binomial std, and no special token touched."""
  chosen = weights.astype(bool)
  assert not chosen[~eligible].any() and (inputs[~chosen] == labels[~chosen]).all()
  assert within(chosen.sum() / eligible.sum(), 0.15, int(eligible.sum()))
  n = int(chosen.sum())
  masked = chosen & (inputs == mask_id)
  replaced = chosen & (inputs != mask_id) & (inputs != labels)
  kept = chosen & (inputs == labels)
  ordinary = vocab - len(special_ids)  # a random id equals the original 1/ordinary times
  assert within(masked.sum() / n, 0.8, n)
  assert within(replaced.sum() / n, 0.1 * (1 - 1 / ordinary), n)
  assert within(kept.sum() / n, 0.1 + 0.1 / ordinary, n)
  assert not np.isin(inputs[replaced], special_ids).any()


def test_mask_tokens_statistics():
  rng = np.random.default_rng(0)
  special_ids = [0, 1, 2, 3, 4]
  tokens = rng.integers(5, 1000, (4000, 128))
  tokens[rng.random(tokens.shape) < 0.1] = 0  # padding and other specials are never chosen
  tokens[:, 0], tokens[:, -1] = 2, 3
  out = masking.mask_tokens(tokens, rng, mask_id=4, special_ids=special_ids, vocab_size=1000)
  assert out['inputs'].dtype == out['labels'].dtype == np.int32
  assert out['weights'].dtype == np.float32 and np.array_equal(out['labels'], tokens)
  check_masking_statistics(out['inputs'], out['labels'], out['weights'], tokens > 4, 4,
                           special_ids, 1000)


def test_bert_masking_in_the_train_stream(run_dir):
  data = text_config(**WORDPIECE)
  workdir = run_dir(data)
  stream, _, _ = text.train_dataset(data, seed=0, workdir=workdir)
  batches = take(iter(stream), 60)
  tok = text_sources.tokenized_text(data, workdir).tokenizer
  batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  assert batch['inputs'].shape == (960, 64) and batch['key_mask'].all()  # no padding in training
  assert (batch['labels'][:, 0] == tok.cls_id).all()
  assert (batch['labels'][:, -1] == tok.sep_id).all()
  eligible = ~np.isin(batch['labels'], tok.special_ids)
  check_masking_statistics(batch['inputs'], batch['labels'], batch['weights'], eligible,
                           tok.mask_id, tok.special_ids, tok.vocab_size)
  # The masking is a function of the seed and the stream position alone.
  again = take(iter(text.train_dataset(data, seed=0, workdir=workdir)[0]), 2)
  assert_batches_equal(again, batches[:2])
  other = take(iter(text.train_dataset(data, seed=1, workdir=workdir)[0]), 1)
  assert not np.array_equal(other[0]['weights'], batches[0]['weights'])


# ------------------------------------------------- resume and processes ---


def test_resume_through_the_trainers_checkpointer_is_exact(run_dir, tmp_path):
  data = text_config(**WORDPIECE)
  workdir = run_dir(data)
  iterator = iter(text.train_dataset(data, seed=3, workdir=workdir)[0])
  take(iterator, 7)
  saver = checkpoint.Checkpointer(tmp_path / 'checkpoints', keep=2)
  saver.save(7, {'step': np.array(7)}, iterator)
  saver.close()
  tail = take(iterator, 5)
  resumed = iter(text.train_dataset(data, seed=3, workdir=workdir)[0])
  restorer = checkpoint.Checkpointer(tmp_path / 'checkpoints', keep=2)
  assert restorer.restore(7, {'step': np.array(0)}, resumed)['step'] == 7
  restorer.close()
  assert_batches_equal(take(resumed, 5), tail)


def test_resume_across_an_epoch_boundary(run_dir):
  data = text_config(seq_len=256, **CHAR)  # 1,640 windows: 102.5 batches an epoch
  workdir = run_dir(data)
  iterator = iter(text.train_dataset(data, seed=0, workdir=workdir)[0])
  take(iterator, 100)
  state = iterator.get_state()
  tail = take(iterator, 6)
  resumed = iter(text.train_dataset(data, seed=0, workdir=workdir)[0])
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 6), tail)


@pytest.mark.parametrize('kind', [CHAR, WORDPIECE])
def test_two_process_shares_make_the_one_process_global_batch(run_dir, kind):
  data = text_config(**kind)
  workdir = run_dir(data)
  whole = take(iter(text.train_dataset(data, seed=5, workdir=workdir)[0]), 3)
  halves = [take(iter(text.train_dataset(data, seed=5, process_index=p, process_count=2,
                                         workdir=workdir)[0]), 3) for p in (0, 1)]
  for k in range(3):
    for key in whole[k]:
      assert halves[0][k][key].shape[0] == 8
      union = np.concatenate([halves[0][k][key], halves[1][k][key]])
      rows = lambda a: sorted(r.tobytes() for r in a.reshape(len(a), -1))
      assert rows(union) == rows(whole[k][key]), key


# ----------------------------------------------------------------- errors ---


def test_missing_or_malformed_sources_name_the_path(tmp_path):
  with pytest.raises(DataError, match=f"text:{tmp_path}/none.txt: no such file '{tmp_path}/"):
    text.train_dataset(text_config(source=f'text:{tmp_path}/none.txt'), seed=0)
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9\n'.encode('latin-1'))
  with pytest.raises(DataError, match='latin1.txt.* is not UTF-8'):
    text.train_dataset(text_config(source=f'text:{tmp_path}/latin1.txt'), seed=0)
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(DataError, match='holds no text'):
    text.train_dataset(text_config(source=f'text:{tmp_path}/empty.txt'), seed=0)
  with pytest.raises(DataError, match=r'Unknown text source .wiki.; expected one of: pydoc, '):
    text.train_dataset(text_config(source='wiki'), seed=0)


def test_missing_tfds_text_fails_fast_naming_the_data_dir(tmp_path):
  start = time.perf_counter()
  with pytest.raises(DataError) as error:
    text.train_dataset(text_config(source='tfds:tiny_shakespeare', tfds_dir=str(tmp_path)),
                       seed=0)
  assert time.perf_counter() - start < 5  # tfds without download=False hangs on the network
  message = str(error.value)
  assert f"dataset 'tiny_shakespeare' is not prepared in data dir {tmp_path}" in message
  assert f'tfds build tiny_shakespeare --data_dir={tmp_path} --file_format=array_record' \
      in message and '--config.data.source=text:PATH' in message
  with pytest.raises(DataError, match='TFDS has no dataset named .no_such_text_xyz.'):
    text.train_dataset(text_config(source='tfds:no_such_text_xyz', tfds_dir=str(tmp_path)),
                       seed=0)


def test_prepared_tfds_text_dataset(tmp_path, monkeypatch):
  tfds_source.write_text_dataset(
      'ssl_jax_tiny_text', lambda: (f'document {i}: ' + 'words ' * 30 for i in range(10)),
      str(tmp_path))
  documents = text_sources.read_documents('tfds:ssl_jax_tiny_text', str(tmp_path))
  assert sorted(documents) == sorted(f'document {i}: ' + 'words ' * 30 for i in range(10))
  data = text_config(source='tfds:ssl_jax_tiny_text', tfds_dir=str(tmp_path), seq_len=16,
                     batch_size=4, **CHAR)
  monkeypatch.setattr(text_sources, '_READ_BLOCK', 3)  # records are streamed in blocks
  corpus = text_sources.tokenized_text(data, tmp_path / 'run')
  assert corpus.counts['train_docs'] == 9 and corpus.counts['val_docs'] == 1
  assert (corpus.train == corpus.tokenizer.eot_id).sum() == 9
  eot = [corpus.tokenizer.eot_id]
  assert np.array_equal(corpus.train, sum((corpus.tokenizer.encode(d) + eot
                                           for d in documents[:9]), []))
  assert next(iter(text.train_dataset(data, seed=0, workdir=tmp_path / 'run')[0]))[
      'tokens'].shape == (4, 16)


def test_config_errors_happen_at_call_time(run_dir):
  workdir = run_dir(text_config(**CHAR))
  with pytest.raises(DataError, match=r'config.data.objective=.gpt.'):
    text.train_dataset(text_config(objective='gpt'), seed=0, workdir=workdir)
  with pytest.raises(DataError, match=r'config.data.val_fraction=0'):
    text.train_dataset(text_config(val_fraction=0), seed=0, workdir=workdir)
  with pytest.raises(DataError, match=r'config.data.mask_prob=0'):
    text.train_dataset(text_config(mask_prob=0, **WORDPIECE), seed=0,
                       workdir=run_dir(text_config(**WORDPIECE)))
  with pytest.raises(DataError, match=r'fewer than one global batch of config.data.batch_size=16'):
    text.train_dataset(text_config(seq_len=40_000, **CHAR), seed=0, workdir=workdir)
  with pytest.raises(DataError, match='batch_size=30 must be a positive multiple .* 4'):
    text.train_dataset(text_config(batch_size=30), seed=0, process_count=4, workdir=workdir)
