"""Token files: the memmapped pipeline equals the in-memory one, pickles small, streams."""

import dataclasses
import os
import pickle

import cloudpickle
import numpy as np
import pytest

from ssl_jax.data import pipeline, text, text_sources, token_store
from tests.data_fixtures import assert_batches_equal, take
from tests.text_fixtures import CHAR, WORDPIECE, text_config


def in_memory_stream(tokenizer, documents: list[str], separator: int) -> np.ndarray:
  """The int32 stream as the pipeline built it before the files: one list, one array."""
  return np.array([i for d in documents for i in tokenizer.encode(d) + [separator]], np.int32)


def in_memory_corpus(data, workdir) -> tuple[text_sources.TokenizedText, dict[str, np.ndarray]]:
  """The corpus of the files, and both splits re-encoded in memory from the source."""
  corpus = text_sources.tokenized_text(data, workdir)
  separator = text_sources.separator_id(corpus.tokenizer, data.objective)
  splits = text_sources.split_documents(text_sources.read_documents(data.source), 0.1)
  return corpus, {name: in_memory_stream(corpus.tokenizer, documents, separator)
                  for name, documents in zip(('train', 'val'), splits, strict=True)}


# ------------------------------------------------------------------ files ---


@pytest.mark.parametrize('kind', [CHAR, WORDPIECE])
def test_files_hold_the_in_memory_streams_as_uint16(run_dir, kind):
  data = text_config(**kind)
  corpus, arrays = in_memory_corpus(data, run_dir(data))
  for name in ('train', 'val'):
    tokens = getattr(corpus, name)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
    assert np.array_equal(tokens, arrays[name])
  assert os.path.dirname(corpus.train_file.path) == os.path.join(run_dir(data), 'tokens')


def test_dtype_follows_the_vocabulary_and_ids_never_wrap(tmp_path):
  assert token_store.token_dtype(65_536) == np.uint16  # ids 0 ... 65,535
  assert token_store.token_dtype(65_537) == token_store.token_dtype(200_000) == np.uint32
  ids = [np.array([0, 70_000, 4_000_000_000]), np.array([], np.int64), np.array([7])]
  written = token_store.write_token_file(tmp_path / 'big.npy', ids, np.uint32)
  assert written.tokens.dtype == np.uint32 and list(written.tokens) == [0, 70_000, 4e9, 7]
  assert np.array_equal(np.load(tmp_path / 'big.npy'), written.tokens)  # a plain .npy
  with pytest.raises(ValueError, match='do not fit uint16'):
    token_store.write_token_file(tmp_path / 'small.npy', ids, np.uint16)
  assert os.listdir(tmp_path) == ['big.npy']  # no half-written file, final or temporary
  empty = token_store.write_token_file(tmp_path / 'empty.npy', [], np.uint16)
  assert len(empty) == 0 and empty.tokens.dtype == np.uint16


def test_a_changed_source_or_split_is_not_served_from_a_stale_cache(tmp_path):
  path = tmp_path / 'book.txt'
  path.write_text('abc abc\n' * 400)
  data = text_config(source=f'text:{path}', seq_len=16, batch_size=4, **CHAR)
  workdir = tmp_path / 'run'
  first = text_sources.tokenized_text(data, workdir)
  tokenizer = first.tokenizer
  path.write_text('cab cab\n' * 500)  # the same alphabet: the saved tokenizer still fits
  os.utime(path, ns=(1, 1))  # a new mtime even on a coarse clock
  second = text_sources.tokenized_text(data, workdir)
  assert second.train_file.path != first.train_file.path
  assert np.array_equal(second.val, tokenizer.encode('cab cab\n' * 50) + [tokenizer.eot_id])
  assert len(second.train) == 8 * 450 + 1
  data.val_fraction = 0.2
  third = text_sources.tokenized_text(data, workdir)
  assert len(third.val) == 8 * 100 + 1 and third.val_file.path != second.val_file.path
  # Three sources and splits, three pairs of files; each marked complete by its .json.
  names = sorted(os.listdir(workdir / 'tokens'))
  assert len(names) == 9 and not [n for n in names if '.tmp' in n]


def test_tokenising_streams_in_chunks_of_documents(monkeypatch, tmp_path):
  calls = []
  encode_batch = text_sources.Tokenizer.encode_batch

  def counting(self, texts):
    calls.append(len(texts))
    return encode_batch(self, texts)

  monkeypatch.setattr(token_store, 'ENCODE_CHUNK', 10)
  monkeypatch.setattr(text_sources.Tokenizer, 'encode_batch', counting)
  data = text_config(**CHAR)
  corpus, arrays = in_memory_corpus(data, None)  # no workdir: a temporary directory
  assert np.array_equal(corpus.train, arrays['train'])
  assert max(calls) == 10 and sum(calls) == corpus.counts['train_docs'] + corpus.counts['val_docs']


# --------------------------------------------------------------- pipelines ---


def in_memory_transform(corpus, arrays, data, split: str, seed: int, epoch_length):
  """The pipeline's transform with the split's tokens as an int32 array in memory."""
  transform = text.windows_transform(corpus, data, split, seed, epoch_length)
  assert isinstance(transform.tokens, token_store.TokenFile)
  return dataclasses.replace(transform, tokens=arrays[split])


@pytest.mark.parametrize('kind,seq_len,steps', [(CHAR, 256, 110), (WORDPIECE, 64, 40)])
def test_memmapped_train_batches_equal_in_memory_ones_and_resume(run_dir, kind, seq_len, steps):
  data = text_config(seq_len=seq_len, **kind)  # char: 1,640 windows, the epoch ends at batch 103
  workdir = run_dir(data)
  corpus, arrays = in_memory_corpus(data, workdir)
  stream, num_windows, _ = text.train_dataset(data, seed=4, workdir=workdir)
  reference = pipeline.process_stream(text.train_windows(in_memory_transform(
      corpus, arrays, data, 'train', 4, num_windows), num_windows, 4), data, 0, 1)
  memmapped, in_memory = iter(stream), iter(reference)
  assert_batches_equal(take(memmapped, steps), take(in_memory, steps))
  # A state saved by one resumes the other.
  resumed = iter(text.train_dataset(data, seed=4, workdir=workdir)[0])
  resumed.set_state(in_memory.get_state())
  assert_batches_equal(take(resumed, 3), take(in_memory, 3))


@pytest.mark.parametrize('kind', [CHAR, WORDPIECE])
def test_memmapped_eval_batches_equal_in_memory_ones(run_dir, kind):
  data = text_config(**kind)
  workdir = run_dir(data)
  corpus, arrays = in_memory_corpus(data, workdir)
  transform = in_memory_transform(corpus, arrays, data, 'val', text.EVAL_MASK_SEED, None)
  for p in (0, 1):
    memmapped = text.eval_batches(data, batch_size=32, process_index=p, process_count=2,
                                  workdir=workdir)
    windows = text.num_eval_windows(len(arrays['val']), data.objective, data.seq_len)
    reference = pipeline.padded_eval_batches(
        pipeline.grain.MapDataset.range(windows).map_with_index(transform),
        transform.map_with_index(0, -1), data, local_batch=16, process_index=p, process_count=2)
    assert_batches_equal(list(memmapped), list(reference))


def test_pickled_transform_holds_the_path_not_the_tokens(run_dir):
  data = text_config(**WORDPIECE)
  workdir = run_dir(data)
  corpus = text_sources.tokenized_text(data, workdir)
  transform = text.windows_transform(corpus, data, 'train', 0, 100)
  transform.map_with_index(0, 3)  # maps the file here first: the map must not travel
  size = len(cloudpickle.dumps(transform))
  assert size < 1000 < corpus.train.nbytes // 100, size
  received = pickle.loads(pickle.dumps(transform))
  assert received.tokens.path == corpus.train_file.path and received.tokens._tokens is None
  assert_batches_equal([received.map_with_index(7, 3)], [transform.map_with_index(7, 3)])
  assert isinstance(received.tokens.tokens, np.memmap)


def test_worker_processes_give_the_same_batches(run_dir):
  data = text_config(**CHAR)
  workdir = run_dir(data)
  in_process = take(iter(text.train_dataset(data, seed=2, workdir=workdir)[0]), 4)
  data.num_workers = 2
  workers = iter(text.train_dataset(data, seed=2, workdir=workdir)[0])
  try:
    assert_batches_equal(take(workers, 4), in_process)
  finally:
    workers.close()
