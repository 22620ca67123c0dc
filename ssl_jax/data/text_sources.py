"""Text sources, the held-out split, and the tokenised corpus (memory-mapped files).

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
                     Its documents are read record by record on each pass
                     (lengths, tokenizer training, encoding), never held all
                     at once.

Held-out split: the last `data.val_fraction` of the characters, documents in
source order, is the validation split. The cut moves back to the start of
its line, and the document it falls in becomes two pieces, one per split.
The tokenizer is trained on the training split only, and no training window
holds a validation token: the splits are tokenised and packed separately.

Tokenising: each split's documents are encoded in chunks and appended to a
file, each followed by the document separator: <|endoftext|> for causal_lm
(as nanoGPT prepares OpenWebText for GPT-2), [SEP] for masked_lm (RoBERTa's
FULL-SENTENCES packing). The files are WORKDIR/tokens/<key>.{train,val}.npy
(uint16 or uint32, see token_store.py; key: a hash of the tokenizer file, the
source, objective and val_fraction, so a changed source or tokenizer never
reuses a stale file), then <key>.json marks them complete. Without a workdir
they go to a temporary directory of the process. Readers memory-map them.
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np

from ssl_jax.data import token_store
from ssl_jax.data.tfds_source import open_tfds
from ssl_jax.data.token_store import TokenFile
from ssl_jax.data.tokenizer import OBJECTIVES, Tokenizer, tokenizer_for_run
from ssl_jax.errors import DataError

SPEC_FORMS = ('pydoc', 'text:PATH', 'tfds:NAME[:SPLIT]')
_CACHE_VERSION = 2  # 2: memory-mapped uint16/uint32 files (1: int32 arrays).
_READ_BLOCK = 1024  # TFDS records per read.
_STATISTICS_CHUNK = 1 << 24  # Tokens per bincount: statistics of a 2B-token file in bounded memory.


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedText:
  """Both splits of a text source as token files, with the tokenizer that made them.

  Attributes:
    name: the source spec.
    tokenizer: the run's tokenizer (saved as WORKDIR/tokenizer.json).
    train_file, val_file: the splits' token streams on disk (every document
      followed by the separator, <|endoftext|> or [SEP]); the pipelines hand
      these to grain by path.
    counts: documents and characters per split ('train_docs', 'val_docs',
      'train_chars', 'val_chars').
  """

  name: str
  tokenizer: Tokenizer
  train_file: TokenFile
  val_file: TokenFile
  counts: dict[str, int]

  @property
  def train(self) -> np.ndarray:
    """The (N,) read-only uint16/uint32 memmap of the training stream."""
    return self.train_file.tokens

  @property
  def val(self) -> np.ndarray:
    """The (N,) read-only uint16/uint32 memmap of the validation stream."""
    return self.val_file.tokens


# --------------------------------------------------------------- sources ---


class Documents:
  """The documents of a source in source order, readable again and again.

  pydoc and a text file are held in memory (a file is one document); a TFDS
  source is read record by record on every pass, so a web-scale slice is
  never held whole. Indices count every record; an empty one reads as ''.
  """

  def __init__(self, spec: str, tfds_dir: str | None = None):
    kind, _, rest = spec.partition(':')
    self.spec = spec
    self._records = None
    self._texts: list[str] | None = None
    if spec == 'pydoc':
      import pydoc_data.topics  # pylint: disable=g-import-not-at-top

      self._texts = list(pydoc_data.topics.topics.values())
    elif kind == 'text' and rest:
      self._texts = [_read_text_file(rest, spec)]
    elif kind == 'tfds' and rest:
      self._records = _open_tfds_text(rest, spec, tfds_dir)
    else:
      raise DataError(f'Unknown text source {spec!r}; expected one of: ' + ', '.join(SPEC_FORMS))

  @classmethod
  def of(cls, texts: list[str], spec: str = 'documents') -> 'Documents':
    """Documents over an in-memory list (tests, `split_documents`)."""
    documents = cls.__new__(cls)
    documents.spec, documents._records, documents._texts = spec, None, list(texts)
    return documents

  def __len__(self) -> int:
    return len(self._texts) if self._texts is not None else len(self._records)

  def read(self, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Documents start, ..., stop - 1 (empty ones included, as '')."""
    stop = len(self) if stop is None else stop
    if self._texts is not None:
      yield from self._texts[start:stop]
      return
    # tfds data sources read a batch of records in one call (`__getitems__`).
    for block in range(start, stop, _READ_BLOCK):
      keys = list(range(block, min(block + _READ_BLOCK, stop)))
      yield from (_as_str(record['text']) for record in self._records.__getitems__(keys))


def read_documents(spec: str, tfds_dir: str | None = None) -> list[str]:
  """All non-empty documents of the source `spec`, in source order (held in memory)."""
  documents = [d for d in Documents(spec, tfds_dir).read() if d]
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


# ----------------------------------------------------------------- split ---


@dataclasses.dataclass(frozen=True)
class HeldOutSplit:
  """Where validation starts: character `local` of document `k` (k == len: no validation).

  Built from the documents' lengths alone (`held_out_split`); `train()` and
  `val()` stream the two splits' non-empty documents from the source.
  """

  documents: Documents
  lengths: np.ndarray  # (D,) int64 characters of every document.
  k: int
  local: int

  def train(self) -> Iterator[str]:
    """The training split: documents before k, then the head of document k."""
    yield from (d for d in self.documents.read(0, self.k) if d)
    if self.k < len(self.lengths) and self.local:
      yield next(self.documents.read(self.k, self.k + 1))[:self.local]

  def val(self) -> Iterator[str]:
    """The validation split: the tail of document k, then every later document."""
    if self.k < len(self.lengths):
      yield next(self.documents.read(self.k, self.k + 1))[self.local:]
      yield from (d for d in self.documents.read(self.k + 1) if d)

  def counts(self) -> dict[str, int]:
    """Documents and characters per split."""
    nonempty = self.lengths > 0
    head = int(self.lengths[:self.k].sum()) + self.local
    has_val = self.k < len(self.lengths)
    return {'train_docs': int(nonempty[:self.k].sum()) + int(has_val and self.local > 0),
            'val_docs': int(nonempty[self.k + 1:].sum()) + int(has_val),
            'train_chars': head, 'val_chars': int(self.lengths.sum()) - head}


def held_out_split(documents: Documents, val_fraction: float) -> HeldOutSplit:
  """The split that holds out the last `val_fraction` of the characters (one pass to measure)."""
  lengths = np.fromiter((len(d) for d in documents.read()), np.int64, len(documents))
  ends = np.cumsum(lengths)
  if not len(ends) or not ends[-1]:
    raise DataError(f'{documents.spec}: the source holds no text')
  cut = round(int(ends[-1]) * (1 - val_fraction))
  k = int(np.searchsorted(ends, cut, side='right'))  # The document holding character `cut`.
  if k == len(lengths):
    return HeldOutSplit(documents, lengths, k, 0)
  local = cut - int(ends[k] - lengths[k])
  line_start = next(documents.read(k, k + 1)).rfind('\n', 0, local)
  return HeldOutSplit(documents, lengths, k, line_start + 1 if line_start >= 0 else local)


def split_documents(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """(train, val): the last `val_fraction` of the characters is validation."""
  split = held_out_split(Documents.of(documents), val_fraction)
  return list(split.train()), list(split.val())


class _Rereadable:
  """An iterable that streams `read()` afresh each time (a tokenizer may read twice)."""

  def __init__(self, read: Callable[[], Iterator[str]]):
    self._read = read

  def __iter__(self) -> Iterator[str]:
    return self._read()


# ------------------------------------------------------------ tokenising ---


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


def tokenized_text(data: ml_collections.ConfigDict,
                   workdir: str | os.PathLike | None) -> TokenizedText:
  """Both splits of `data.source` tokenised by the run's tokenizer, from cache when possible."""
  check_text_config(data)

  @functools.cache
  def split() -> HeldOutSplit:
    split = held_out_split(Documents(data.source, data.tfds_dir), data.val_fraction)
    counts = split.counts()
    if not counts['train_docs'] or not counts['val_docs']:
      raise DataError(f'{data.source}: config.data.val_fraction={data.val_fraction} leaves an '
                      'empty split; the source is too small')
    return split

  tokenizer = tokenizer_for_run(data, workdir, lambda: _Rereadable(split().train))
  key = hashlib.sha256(json.dumps([
      _CACHE_VERSION, tokenizer.to_json(), source_fingerprint(data.source, data.tfds_dir),
      data.objective, data.val_fraction]).encode()).hexdigest()[:16]
  prefix = os.path.join(token_store.cache_dir(workdir), key)
  if prefix in _MEMORY:  # The files of another workdir may be removed with it: key by place.
    return _MEMORY[prefix]
  if not os.path.exists(f'{prefix}.json'):
    _write_cache(prefix, split(), tokenizer, data.objective)
  with open(f'{prefix}.json') as f:
    counts = json.load(f)
  text = TokenizedText(data.source, tokenizer, TokenFile(f'{prefix}.train.npy'),
                       TokenFile(f'{prefix}.val.npy'), counts)
  while len(_MEMORY) >= _MEMORY_SIZE:
    del _MEMORY[next(iter(_MEMORY))]  # The oldest: dicts keep insertion order.
  _MEMORY[prefix] = text
  return text


def _write_cache(prefix: str, split: HeldOutSplit, tokenizer: Tokenizer, objective: str) -> None:
  """Encodes both splits into token files, then writes the counts that mark them complete."""
  separator = separator_id(tokenizer, objective)
  dtype = token_store.token_dtype(tokenizer.vocab_size)
  for name, documents in (('train', split.train()), ('val', split.val())):
    token_store.write_token_file(
        f'{prefix}.{name}.npy', token_store.encoded_chunks(tokenizer, documents, separator), dtype)
  token_store.write_text_atomically(f'{prefix}.json', json.dumps(split.counts()))


# ------------------------------------------------------------ statistics ---


def token_counts(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
  """(vocab_size,) int64 occurrences of each id, read in chunks (a memmap stays on disk)."""
  counts = np.zeros((vocab_size,), np.int64)
  for start in range(0, len(tokens), _STATISTICS_CHUNK):
    counts += np.bincount(tokens[start:start + _STATISTICS_CHUNK], minlength=vocab_size)
  return counts


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Entropy in nats of the token frequencies: a model that ignores context scores this."""
  return _entropy(token_counts(tokens, vocab_size))


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
  """Mean nats of `val` under the add-one-smoothed unigram frequencies of `train`."""
  return _cross_entropy(token_counts(train, vocab_size), token_counts(val, vocab_size))


def _entropy(counts: np.ndarray) -> float:
  """Entropy in nats of the distribution proportional to `counts`."""
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def _cross_entropy(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
  """Mean nats of the val tokens under add-one-smoothed train frequencies (counts per id)."""
  log_p = np.log((train_counts + 1.0) / (train_counts.sum() + len(train_counts)))
  return float(-(val_counts * log_p).sum() / val_counts.sum())


def describe(text: TokenizedText) -> str:
  """A one-line summary of the corpus for logs."""
  c, tokenizer = text.counts, text.tokenizer
  train_counts = token_counts(text.train, tokenizer.vocab_size)
  val_counts = token_counts(text.val, tokenizer.vocab_size)
  return (f'{text.name} ({c["train_docs"]:,} / {c["val_docs"]:,} docs, {c["train_chars"]:,} / '
          f'{c["val_chars"]:,} chars train / val) -> {tokenizer.kind} tokenizer, vocab '
          f'{tokenizer.vocab_size:,} -> {len(text.train):,} / {len(text.val):,} tokens '
          f'({text.train.dtype} files); unigram entropy {_entropy(train_counts):.3f} nats (val '
          f'under train unigrams {_cross_entropy(train_counts, val_counts):.3f}, '
          f'uniform {math.log(tokenizer.vocab_size):.3f})')
