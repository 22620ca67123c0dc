"""grain pipelines of the text methods: packed token windows, BERT masking, eval passes.

Each split is one token stream (`text_sources.tokenized_text`: documents
joined by <|endoftext|> or [SEP]) in a memory-mapped file that the transform
holds by path (token_store.py), cut into windows of T = `data.seq_len`:

  causal_lm  window i = stream[i(T-1) : i(T-1) + T]. Consecutive windows share
             one token, so each next-token pair of the stream lies in exactly
             one window; `next_token_loss` shifts inside the window.
  masked_lm  window i = [CLS] stream[i(T-2) : (i+1)(T-2)] [SEP]: as RoBERTa's
             FULL-SENTENCES packing, windows cross documents (which meet at
             a [SEP]); unlike it they cut at any token, not at sentence ends.
             One segment and no next-sentence task: token_types are all 0.

Train stream, built as the image pipeline's (see pipeline.py):

  window slots -> shuffle (a new permutation each epoch) -> repeat forever
    -> window at (slot * stride + the epoch's offset), the offset drawn in
       [0, stride) from (seed, epoch): every epoch tiles the stream once at a
       new alignment (nanoGPT draws random starts for the same reason)
    -> masked_lm: BERT's masking (masking.py), rng = f(seed, global position)
    -> every process_count-th element from process_index -> batch

so global batch k is the same for any process count, and the iterator state
(grain's ElasticIterator: one integer) resumes it exactly; ssl_jax/checkpoint.py
saves it as it saves the image stream's.

Eval passes take the validation windows at offset 0, each exactly once; the
last, partial window is padded, and batches are filled up with empty windows.
Padding has weight 0, so it never counts. masked_lm masks with a fixed seed:
every eval corrupts the same positions.

Batches (dicts of numpy arrays; b = batch size / process_count):

  causal_lm  tokens int32 (b, T); weights float32 (b, T), where weights[:, t] = 1
             when predicting tokens[:, t] from position t-1 counts (always 0 at
             t = 0 and at padding), as `losses.next_token_loss` reads it.
  masked_lm  inputs int32 (b, T) the corrupted tokens; labels int32 (b, T) the
             original ones; weights float32 (b, T) 1 at chosen positions (for
             `losses.masked_lm_loss`); token_types int32 (b, T) zeros; key_mask
             bool (b, T), False at padding (keys nobody may attend to).

Config keys read from `config.data`: source, tfds_dir, batch_size (global),
objective ('causal_lm' | 'masked_lm'), tokenizer, vocab_size, seq_len,
val_fraction, mask_prob (masked_lm only), num_workers, prefetch. See
text_sources.py for the sources and split, tokenizer.py for the tokenizers.
"""

import dataclasses
import math
from typing import Any

import grain
import ml_collections
import numpy as np

from ssl_jax.data import masking
from ssl_jax.data.pipeline import (
  EvalBatches,
  check_process_index,
  padded_eval_batches,
  per_process_batch_size,
  process_stream,
)
from ssl_jax.data.text_sources import TokenizedText, describe, token_counts, tokenized_text
from ssl_jax.data.token_store import TokenFile
from ssl_jax.data.tokenizer import Tokenizer
from ssl_jax.errors import DataError

# Seeds the masking of eval windows: the same corruption at every eval.
EVAL_MASK_SEED = 0


def window_geometry(objective: str, seq_len: int) -> tuple[int, int]:
  """(width, stride): stream tokens per window and the distance between window slots."""
  if objective == 'causal_lm':
    return seq_len, seq_len - 1
  return seq_len - 2, seq_len - 2  # Room for [CLS] and the closing [SEP].


def num_train_windows(num_tokens: int, objective: str, seq_len: int) -> int:
  """Window slots per epoch: they fit the stream at every offset in [0, stride)."""
  width, stride = window_geometry(objective, seq_len)
  return max(0, (num_tokens - width + 1) // stride)


def num_eval_windows(num_tokens: int, objective: str, seq_len: int) -> int:
  """Windows at offset 0 that cover every token (causal: every next-token pair) once."""
  width, stride = window_geometry(objective, seq_len)
  return max(0, math.ceil((num_tokens - (width - stride)) / stride))


def epoch_offset(seed: int, epoch: int, stride: int) -> int:
  """Where the window slots of `epoch` start: a fresh alignment every epoch."""
  return int(np.random.default_rng([seed, epoch, 1]).integers(stride))


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """What packing and masking need of a tokenizer: a few ints (a tokenizer pickles its vocab)."""

  pad_id: int
  cls_id: int | None
  sep_id: int | None
  mask_id: int | None
  special_ids: tuple[int, ...]
  vocab_size: int

  @classmethod
  def of(cls, tokenizer: Tokenizer) -> 'SpecialIds':
    """The ids of `tokenizer`."""
    return cls(tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id,
               tuple(tokenizer.special_ids), tokenizer.vocab_size)


@dataclasses.dataclass(frozen=True, eq=False)
class PackedWindows(grain.transforms.MapWithIndex):
  """Window slot `slot` of a token stream as one example (slot -1: an empty, padding window).

  `index` is the position in the global stream (train) or the window's own
  index (eval): with `seed` it fixes the masking, and with `epoch_length` (the
  windows per epoch; None at eval: offset 0) the epoch and so its offset.

  The stream is a `TokenFile`, so pickling this transform into grain's worker
  processes sends a path and a few ids (~ 400 bytes), never the tokens; each
  worker memory-maps the file itself. Any (N,) array slices the same way.
  """

  tokens: TokenFile | np.ndarray  # (N,) uint16/uint32, the split's stream
  objective: str
  seq_len: int
  ids: SpecialIds  # the tokenizer's special ids and vocabulary size
  mask_prob: float
  seed: int
  epoch_length: int | None

  def map_with_index(self, index: int, slot: int) -> dict[str, np.ndarray]:
    """The example of window `slot` at stream position `index`."""
    width, stride = window_geometry(self.objective, self.seq_len)
    if slot < 0:
      chunk = self.tokens[:0]
    else:
      offset = 0 if self.epoch_length is None else epoch_offset(
          self.seed, index // self.epoch_length, stride)
      chunk = self.tokens[slot * stride + offset:slot * stride + offset + width]
    if self.objective == 'causal_lm':
      return causal_example(chunk, self.seq_len, self.ids.pad_id)
    rng = np.random.default_rng([self.seed, index])
    return masked_example(chunk, self.seq_len, self.ids, rng, self.mask_prob)


def causal_example(chunk: np.ndarray, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """{'tokens', 'weights'} of a GPT window; a short chunk is padded at the end."""
  tokens = np.full((seq_len,), pad_id, np.int32)
  tokens[:len(chunk)] = chunk
  weights = np.zeros((seq_len,), np.float32)
  weights[1:len(chunk)] = 1.0  # Token 0 is never a target.
  return {'tokens': tokens, 'weights': weights}


def masked_example(chunk: np.ndarray, seq_len: int, tokenizer: SpecialIds | Tokenizer,
                   rng: np.random.Generator, mask_prob: float) -> dict[str, np.ndarray]:
  """[CLS] chunk [SEP] [PAD]..., masked: inputs, labels, weights, token_types, key_mask."""
  length = len(chunk) + 2
  tokens = np.full((seq_len,), tokenizer.pad_id, np.int32)
  tokens[0], tokens[1:length - 1], tokens[length - 1] = tokenizer.cls_id, chunk, tokenizer.sep_id
  example = masking.mask_tokens(tokens, rng, mask_id=tokenizer.mask_id,
                                special_ids=tokenizer.special_ids,
                                vocab_size=tokenizer.vocab_size, mask_prob=mask_prob)
  example['token_types'] = np.zeros((seq_len,), np.int32)
  example['key_mask'] = np.arange(seq_len) < length
  return example


def windows_transform(text: TokenizedText, data: ml_collections.ConfigDict, split: str,
                      seed: int, epoch_length: int | None) -> PackedWindows:
  """The transform that cuts `split` ('train' or 'val') of `text` into examples."""
  mask_prob = data.mask_prob if data.objective == 'masked_lm' else 0.0
  if data.objective == 'masked_lm' and not 0 < mask_prob < 1:
    raise DataError(f'config.data.mask_prob={mask_prob!r}; expected a probability in (0, 1)')
  return PackedWindows(getattr(text, f'{split}_file'), data.objective, data.seq_len,
                       SpecialIds.of(text.tokenizer), mask_prob, seed, epoch_length)


def train_windows(transform: PackedWindows, num_windows: int, seed: int) -> grain.MapDataset:
  """The endless global stream of train examples: shuffled slots, a new offset every epoch."""
  return (
      grain.MapDataset.range(num_windows)
      .seed(seed)    # grain derives the shuffle from it.
      .shuffle()     # repeat() reseeds it: a new permutation every epoch.
      .repeat()
      .map_with_index(transform)
  )


def train_dataset(
    data: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    workdir: str | None = None,
) -> tuple[Any, int, str]:
  """The infinite, shuffled train stream of this process, its window count, and a summary.

  `iter()` of the returned dataset gives the batches described in the module
  docstring with b = data.batch_size // process_count; it is grain's
  ElasticIterator (get_state/set_state, grain.checkpoint.CheckpointSave and
  CheckpointRestore), one iterator per dataset. The tokenizer is trained or
  loaded here and saved as WORKDIR/tokenizer.json (workdir None: kept in
  memory only). Every user error is raised here, not at next().
  """
  batch_size = per_process_batch_size(data.batch_size, process_count, 'config.data.batch_size')
  check_process_index(process_index, process_count)
  if seed < 0:
    raise DataError(f'seed={seed}: grain needs a non-negative seed')
  text = tokenized_text(data, workdir)
  num_windows = num_train_windows(len(text.train), data.objective, data.seq_len)
  if num_windows < data.batch_size:
    raise DataError(
        f'{text.name}: the training split has {len(text.train):,} tokens, {num_windows} '
        f'windows of config.data.seq_len={data.seq_len}, fewer than one global batch of '
        f'config.data.batch_size={data.batch_size}; lower seq_len or batch_size, or use more text')
  transform = windows_transform(text, data, 'train', seed, epoch_length=num_windows)
  stream = process_stream(train_windows(transform, num_windows, seed), data, process_index,
                          process_count)
  num_eval = num_eval_windows(len(text.val), data.objective, data.seq_len)
  summary = (f'{describe(text)} -> {num_windows:,} train / {num_eval:,} val windows of '
             f'{data.seq_len} tokens ({data.objective}); batch {data.batch_size} = {batch_size} x '
             f'{process_count} process(es); {data.num_workers} worker process(es)')
  return stream, num_windows, summary


def eval_batches(
    data: ml_collections.ConfigDict,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    workdir: str | None = None,
) -> EvalBatches:
  """In-order batches of this process's share of the validation windows, padded.

  batch_size is global; process p gets windows p, p + P, ...; every process
  yields the same number of batches (empty windows fill the last ones).
  `num_examples` of the result counts the real windows over all processes.
  """
  local_batch = per_process_batch_size(batch_size, process_count, 'eval batch_size')
  check_process_index(process_index, process_count)
  text = tokenized_text(data, workdir)
  transform = windows_transform(text, data, 'val', EVAL_MASK_SEED, epoch_length=None)
  num_windows = num_eval_windows(len(text.val), data.objective, data.seq_len)
  # Masking draws depend on the global window index, not on the process share.
  windows = grain.MapDataset.range(num_windows).map_with_index(transform)
  # Window index -1 is an empty window: all padding, weight 0.
  return padded_eval_batches(windows, transform.map_with_index(0, -1), data,
                             local_batch=local_batch, process_index=process_index,
                             process_count=process_count)


def most_frequent_share(tokens: np.ndarray, special_ids: tuple[int, ...],
                        vocab_size: int) -> float:
  """Accuracy of always predicting the most frequent ordinary token of `tokens`."""
  counts = token_counts(tokens, vocab_size)
  counts[list(special_ids)] = 0
  return float(counts.max() / counts.sum()) if counts.any() else 0.0


def chance_baseline(corpus: TokenizedText, objective: str) -> str:
  """Words for the start-up log: what a model that learns nothing scores on the val split.

  Masked LM: the masked accuracy of always guessing the most frequent
  ordinary validation token. Causal LM: nothing (its val loss speaks for itself).
  """
  if objective != 'masked_lm':
    return ''
  share = most_frequent_share(corpus.val, corpus.tokenizer.special_ids,
                              corpus.tokenizer.vocab_size)
  return f'; always guessing the most frequent val token scores masked accuracy {share:.3f}'
