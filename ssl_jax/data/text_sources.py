"""Text sources, the held-out split, and the tokenised corpus (cached in the workdir).

Accepted specs (`config.data.source`):

  pydoc              the text bundled with CPython: every entry of
                     `pydoc_data.topics.topics`, in the module's order, is a
                     document (79 documents, 464,970 characters on 3.11).
  text:PATH          a UTF-8 file, as ONE document: a plain book or
                     tiny-Shakespeare file is one stream, as in nanoGPT (whose
                     char-level run also holds out the last 10% of characters).
  tfds:NAME[:SPLIT]  a prepared TFDS dataset with a `text` feature (wikipedia,
                     c4, tiny_shakespeare, ...), one document per example,
                     read through its array_record data source; it is never
                     downloaded. All of SPLIT is read (and tokenised once), so
                     slice big ones: tfds:wikipedia/20230601.en:train[:5%].

Held-out split: the last `data.val_fraction` of the characters, documents in
source order, is the validation split. The cut moves back to the start of
its line, and the document it falls in becomes two pieces, one per split.
The tokenizer is trained on the training split only, and no training window
holds a validation token: the splits are tokenised and packed separately.

Tokenising: each split's documents are encoded once and concatenated, each
followed by the document separator: <|endoftext|> for causal_lm (as nanoGPT
prepares OpenWebText for GPT-2), [SEP] for masked_lm (RoBERTa's
FULL-SENTENCES packing). The int32 arrays are cached as
WORKDIR/tokens/<key>.{train,val}.npy (key: a hash of the tokenizer file, the
source, objective and val_fraction) and in memory for the process's life.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys

import ml_collections
import numpy as np

from ssl_jax.data.tfds_source import open_tfds
from ssl_jax.data.tokenizer import OBJECTIVES, Tokenizer, tokenizer_for_run
from ssl_jax.errors import DataError

SPEC_FORMS = ('pydoc', 'text:PATH', 'tfds:NAME[:SPLIT]')
_CACHE_VERSION = 1
_ENCODE_CHUNK = 1024  # Documents per encode_batch call: bounds peak memory.


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedText:
  """Both splits of a text source as token streams, with the tokenizer that made them.

  Attributes:
    name: the source spec.
    tokenizer: the run's tokenizer (saved as WORKDIR/tokenizer.json).
    train, val: (N,) int32 token streams, every document followed by the
      separator (<|endoftext|> or [SEP]).
    counts: documents and characters per split ('train_docs', 'val_docs',
      'train_chars', 'val_chars').
  """

  name: str
  tokenizer: Tokenizer
  train: np.ndarray
  val: np.ndarray
  counts: dict[str, int]


# --------------------------------------------------------------- sources ---


def read_documents(spec: str, tfds_dir: str | None = None) -> list[str]:
  """All non-empty documents of the source `spec`, in source order."""
  kind, _, rest = spec.partition(':')
  if spec == 'pydoc':
    import pydoc_data.topics  # pylint: disable=g-import-not-at-top

    documents = list(pydoc_data.topics.topics.values())
  elif kind == 'text' and rest:
    documents = [_read_text_file(rest, spec)]
  elif kind == 'tfds' and rest:
    data_source = _open_tfds_text(rest, spec, tfds_dir)
    documents = [_as_str(data_source[i]['text']) for i in range(len(data_source))]
  else:
    raise DataError(f'Unknown text source {spec!r}; expected one of: ' + ', '.join(SPEC_FORMS))
  documents = [d for d in documents if d]
  if not documents:
    raise DataError(f'{spec}: the source holds no text')
  return documents


def _as_str(text: bytes | str) -> str:
  """TFDS Text features decode to bytes."""
  return text.decode('utf-8') if isinstance(text, bytes) else str(text)


def _read_text_file(path: str, spec: str) -> str:
  """The contents of a UTF-8 file, or a DataError naming the path."""
  if not os.path.isfile(path):
    raise DataError(f'{spec}: no such file {path!r}; expected a UTF-8 text file')
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise DataError(f'{spec}: {path!r} is not UTF-8 text: {e}') from e


def _open_tfds_text(rest: str, spec: str, tfds_dir: str | None):
  """The data source of a prepared TFDS dataset with a `text` feature."""
  # Registers the text builders that tfds.builder does not find by itself (c4, wikipedia).
  import tensorflow_datasets.text  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

  data_source, _ = open_tfds(rest, spec, tfds_dir, feature='text',
                             alternative=('a text file', 'text:PATH'))
  return data_source


def source_fingerprint(spec: str, tfds_dir: str | None = None) -> str:
  """A string that changes when the source's text may have changed (cheap to compute)."""
  kind, _, rest = spec.partition(':')
  if kind == 'text' and rest and os.path.isfile(rest):
    stat = os.stat(rest)
    return f'{os.path.realpath(rest)}:{stat.st_size}:{stat.st_mtime_ns}'
  if kind == 'tfds':
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return f'{spec}:{tfds_dir or tfds.core.constants.get_default_data_dir()}'
  # pydoc (and a missing file, which fails later with a clear message).
  return f'{spec}:python {sys.version}'


def split_documents(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """(train, val): the last `val_fraction` of the characters is validation."""
  lengths = np.array([len(d) for d in documents], np.int64)
  ends = np.cumsum(lengths)
  cut = round(int(ends[-1]) * (1 - val_fraction))
  k = int(np.searchsorted(ends, cut, side='right'))  # The document holding character `cut`.
  if k == len(documents):
    return list(documents), []
  document = documents[k]
  local = cut - int(ends[k] - lengths[k])
  line_start = document.rfind('\n', 0, local)
  if line_start >= 0:
    local = line_start + 1
  train = documents[:k] + ([document[:local]] if local else [])
  return train, [document[local:]] + documents[k + 1:]


# ------------------------------------------------------------ tokenising ---


def encode_documents(tokenizer: Tokenizer, documents: list[str], separator: int) -> np.ndarray:
  """The int32 stream doc_0 sep doc_1 sep ... doc_n sep."""
  pieces = []
  for start in range(0, len(documents), _ENCODE_CHUNK):
    for ids in tokenizer.encode_batch(documents[start:start + _ENCODE_CHUNK]):
      pieces.append(np.asarray(ids, np.int32))
      pieces.append(np.array([separator], np.int32))
  return np.concatenate(pieces) if pieces else np.zeros((0,), np.int32)


def separator_id(tokenizer: Tokenizer, objective: str) -> int:
  """The token between documents: <|endoftext|> (causal_lm) or [SEP] (masked_lm)."""
  return tokenizer.eot_id if objective == 'causal_lm' else tokenizer.sep_id


_MEMORY: dict[str, TokenizedText] = {}  # Train and eval pipelines share one tokenising.
_MEMORY_SIZE = 4


def check_text_config(data: ml_collections.ConfigDict) -> None:
  """Raises DataError naming the first text key of `data` with an impossible value."""
  valid = {
      'objective': (lambda v: v in OBJECTIVES, f'one of {OBJECTIVES}'),
      'val_fraction': (lambda v: 0 < v < 1, 'in (0, 1)'),
      'seq_len': (lambda v: v >= 3, 'an int >= 3'),
  }
  if data.tokenizer in ('bpe', 'wordpiece'):
    valid['vocab_size'] = (lambda v: v > 0, 'a positive int')
  for key, (ok, expected) in valid.items():
    if not ok(data[key]):
      raise DataError(f'config.data.{key}={data[key]!r}; expected {expected}')


def tokenized_text(data: ml_collections.ConfigDict, workdir: str | None) -> TokenizedText:
  """Both splits of `data.source` tokenised by the run's tokenizer, from cache when possible."""
  check_text_config(data)

  @functools.cache
  def splits() -> tuple[list[str], list[str]]:
    train, val = split_documents(read_documents(data.source, data.tfds_dir), data.val_fraction)
    if not val or not train:
      raise DataError(f'{data.source}: config.data.val_fraction={data.val_fraction} leaves an '
                      'empty split; the source is too small')
    return train, val

  tokenizer = tokenizer_for_run(data, workdir, lambda: splits()[0])
  key = hashlib.sha256(json.dumps([
      _CACHE_VERSION, tokenizer.to_json(), source_fingerprint(data.source, data.tfds_dir),
      data.objective, data.val_fraction]).encode()).hexdigest()[:16]
  if key in _MEMORY:
    return _MEMORY[key]
  prefix = None if workdir is None else os.path.join(workdir, 'tokens', key)
  if prefix is not None and os.path.exists(f'{prefix}.json'):
    with open(f'{prefix}.json') as f:
      counts = json.load(f)
    train_tokens, val_tokens = np.load(f'{prefix}.train.npy'), np.load(f'{prefix}.val.npy')
  else:
    train, val = splits()
    separator = separator_id(tokenizer, data.objective)
    train_tokens = encode_documents(tokenizer, train, separator)
    val_tokens = encode_documents(tokenizer, val, separator)
    counts = {'train_docs': len(train), 'val_docs': len(val),
              'train_chars': sum(map(len, train)), 'val_chars': sum(map(len, val))}
    if prefix is not None:
      _save_cache(prefix, train_tokens, val_tokens, counts)
  text = TokenizedText(data.source, tokenizer, train_tokens, val_tokens, counts)
  while len(_MEMORY) >= _MEMORY_SIZE:
    del _MEMORY[next(iter(_MEMORY))]  # The oldest: dicts keep insertion order.
  _MEMORY[key] = text
  return text


def _save_cache(prefix: str, train: np.ndarray, val: np.ndarray, counts: dict) -> None:
  """Writes the token arrays, then the counts that mark the cache complete (atomically)."""
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  suffix = f'.tmp{os.getpid()}'
  for name, array in (('train', train), ('val', val)):
    with open(f'{prefix}.{name}.npy{suffix}', 'wb') as f:
      np.save(f, array)
    os.replace(f'{prefix}.{name}.npy{suffix}', f'{prefix}.{name}.npy')
  with open(f'{prefix}.json{suffix}', 'w') as f:
    json.dump(counts, f)
  os.replace(f'{prefix}.json{suffix}', f'{prefix}.json')


# ------------------------------------------------------------ statistics ---


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Entropy in nats of the token frequencies: a model that ignores context scores this."""
  counts = np.bincount(tokens, minlength=vocab_size)
  p = counts[counts > 0] / len(tokens)
  return float(-(p * np.log(p)).sum())


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
  """Mean nats of `val` under the add-one-smoothed unigram frequencies of `train`."""
  counts = np.bincount(train, minlength=vocab_size) + 1.0
  return float(-np.log(counts[val] / counts.sum()).mean())


def describe(text: TokenizedText) -> str:
  """A one-line summary of the corpus for logs."""
  c, tokenizer = text.counts, text.tokenizer
  entropy = unigram_entropy(text.train, tokenizer.vocab_size)
  return (f'{text.name} ({c["train_docs"]:,} / {c["val_docs"]:,} docs, {c["train_chars"]:,} / '
          f'{c["val_chars"]:,} chars train / val) -> {tokenizer.kind} tokenizer, vocab '
          f'{tokenizer.vocab_size:,} -> {len(text.train):,} / {len(text.val):,} tokens; '
          f'unigram entropy {entropy:.3f} nats (val under train unigrams '
          f'{unigram_cross_entropy(text.train, text.val, tokenizer.vocab_size):.3f}, '
          f'uniform {math.log(tokenizer.vocab_size):.3f})')
