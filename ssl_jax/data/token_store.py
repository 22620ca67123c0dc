"""Token streams on disk: written once, chunk by chunk, and memory-mapped wherever they are read.

A split's stream is a 1-D `.npy` file of uint16 ids (uint32 when the
vocabulary has more than 65,536 ids; GPT-2's 50,257 fit in uint16, as in
nanoGPT's train.bin), so a 2B-token slice of C4 takes 4 GB of disk and, when
read, only the pages the windows touch.

Writing streams: `write_token_file` appends one encoded chunk of documents
at a time after a placeholder header and rewrites the header with the final
length at the end. numpy leaves room for exactly this: "Add some spare space
so that the array header can be modified in-place when changing the array
size" (numpy 2.4, numpy/lib/_format_impl.py `_write_array_header`),
so the header keeps its size. The file is written under a temporary name and
renamed into place (`os.replace` is atomic on POSIX), so a reader sees either
no file or a complete one, and processes (or hosts sharing a file system)
racing to write it are harmless: each writes its own temporary file.

Reading: a `TokenFile` holds only the path and opens the file with
`np.load(path, mmap_mode='r')` (numpy.load: "the file is memory-mapped
using the given mode") on first use in each process. Pickling drops the map
(`__getstate__`), so grain's worker processes, which receive the pipeline
through cloudpickle (grain/_src/python/dataset/transformations/
process_prefetch.py), get a few hundred bytes and map the file themselves;
the page cache is shared by every process on the host.
"""

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np

from ssl_jax.data.tokenizer import Tokenizer

ENCODE_CHUNK = 1024  # Documents per encode_batch call: bounds the memory of one chunk.
_UINT16_IDS = np.iinfo(np.uint16).max + 1


def token_dtype(vocab_size: int) -> np.dtype:
  """uint16 when every id in [0, vocab_size) fits in it, else uint32."""
  return np.dtype(np.uint16 if vocab_size <= _UINT16_IDS else np.uint32)


class TokenFile:
  """A token stream in a `.npy` file, memory-mapped lazily in each process that reads it.

  Supports `len()` and slicing like the array it holds; `tokens` is the
  read-only (N,) uint16/uint32 memmap itself.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._tokens: np.ndarray | None = None

  @property
  def tokens(self) -> np.ndarray:
    """The (N,) read-only memmap of the file (opened on first use)."""
    if self._tokens is None:
      self._tokens = np.load(self.path, mmap_mode='r')
    return self._tokens

  def __len__(self) -> int:
    return len(self.tokens)

  def __getitem__(self, index) -> np.ndarray:
    return self.tokens[index]

  def __getstate__(self) -> dict:
    # The path alone: the receiving process maps the file itself.
    return {'path': self.path}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state['path'])

  def __repr__(self) -> str:
    return f'TokenFile({self.path!r})'


def encoded_chunks(tokenizer: Tokenizer, documents: Iterable[str],
                   separator: int) -> Iterator[np.ndarray]:
  """int64 pieces of the stream doc_0 sep doc_1 sep ...: one per ENCODE_CHUNK documents."""
  batch = []
  for document in documents:
    batch.append(document)
    if len(batch) == ENCODE_CHUNK:
      yield _encode(tokenizer, batch, separator)
      batch = []
  if batch:
    yield _encode(tokenizer, batch, separator)


def _encode(tokenizer: Tokenizer, documents: list[str], separator: int) -> np.ndarray:
  """One chunk of the stream: each document's ids, then the separator."""
  ids = [np.asarray(i + [separator], np.int64) for i in tokenizer.encode_batch(documents)]
  return np.concatenate(ids)


def write_token_file(path: str | os.PathLike, chunks: Iterable[np.ndarray],
                     dtype: np.dtype) -> TokenFile:
  """Writes the concatenation of `chunks` as a 1-D `.npy` of `dtype` at `path`, atomically.

  Only one chunk is in memory at a time. An id that does not fit `dtype`
  raises ValueError rather than wrapping around.
  """
  path = os.fspath(path)
  dtype = np.dtype(dtype)
  limit = np.iinfo(dtype).max
  fd, temporary = _temporary_beside(path)
  length = 0
  try:
    with os.fdopen(fd, 'wb') as f:
      _write_header(f, dtype, 0)
      start = f.tell()
      for chunk in chunks:
        if len(chunk) and (chunk.min() < 0 or chunk.max() > limit):
          raise ValueError(f'token ids in [{chunk.min()}, {chunk.max()}] do not fit {dtype}')
        f.write(np.ascontiguousarray(chunk, dtype).tobytes())
        length += len(chunk)
      f.seek(0)
      _write_header(f, dtype, length)
      if f.tell() != start:  # numpy pads the header for this; never corrupt a file silently.
        raise RuntimeError(f'{path}: the .npy header changed size when its length was written')
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)  # Never leave a half-written stream behind.
    raise
  return TokenFile(path)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` under a temporary name, then renames it into place."""
  fd, temporary = _temporary_beside(os.fspath(path))
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.replace(temporary, path)
  except BaseException:
    os.remove(temporary)
    raise


def _temporary_beside(path: str) -> tuple[int, str]:
  """A new file next to `path`: unique even across hosts writing one shared directory."""
  directory = os.path.dirname(path) or '.'
  os.makedirs(directory, exist_ok=True)
  return tempfile.mkstemp(prefix=f'{os.path.basename(path)}.tmp', dir=directory)


def _write_header(f, dtype: np.dtype, length: int) -> None:
  """The .npy version 1.0 header of a C-ordered (length,) array of `dtype`."""
  np.lib.format.write_array_header_1_0(f, {
      'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False,
      'shape': (length,)})


_SCRATCH: list[str] = []  # The process's own cache directory when a run has no workdir.


def cache_dir(workdir: str | os.PathLike | None) -> str:
  """WORKDIR/tokens, or (no workdir) a temporary directory removed when the process exits."""
  if workdir is not None:
    return os.path.join(workdir, 'tokens')
  if not _SCRATCH:
    _SCRATCH.append(tempfile.mkdtemp(prefix='ssl_jax_tokens_'))
    atexit.register(shutil.rmtree, _SCRATCH[0], ignore_errors=True)
  return _SCRATCH[0]
