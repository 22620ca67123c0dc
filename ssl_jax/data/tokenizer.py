"""Tokenizers of the text methods: trained BPE or WordPiece, characters, or a user's file.

Config keys read from `config.data`:

  tokenizer   'bpe': byte-level BPE as GPT-2 (any UTF-8 text round-trips, no
              unknown token), 'wordpiece': BERT's (lowercase, accents
              stripped, BertPreTokenizer, `##` continuations), 'char': one id
              per character seen in the training text (nanoGPT's
              tiny-Shakespeare setup), or a PATH to a Hugging Face
              `tokenizer.json` (model kind read from the file; e.g. GPT-2's
              or bert-base-uncased's) or to a char tokenizer file written here.
  vocab_size  size of a trained 'bpe' / 'wordpiece' vocabulary, special tokens
              included (a small corpus may yield fewer); 'char' and files
              ignore it.
  objective   'causal_lm' (GPT) or 'masked_lm' (BERT): which special tokens a
              trained tokenizer gets (`CAUSAL_SPECIAL_TOKENS`,
              `MASKED_SPECIAL_TOKENS`).

A special token written literally in the text (e.g. `<|endoftext|>` between
documents of a text file) is read as that token by the Hugging Face
tokenizers, as by tiktoken with allowed_special='all'; 'char' reads it as
characters.

Training runs offline on the training split only and is deterministic: the
same text gives the same `tokenizer.json` bytes (so every process of a
multi-host run may train its own copy). `tokenizer_for_run` saves the result
as `WORKDIR/tokenizer.json` and reuses that file whenever it exists, so a
resumed run and `python -m ssl_jax.sample --workdir=DIR` see exactly the same
ids: load it with `load_tokenizer(DIR / 'tokenizer.json')`.
"""

import abc
import json
import os
from collections.abc import Callable, Iterable, Sequence

import ml_collections
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from ssl_jax.errors import DataError

KINDS = ('bpe', 'wordpiece', 'char')
OBJECTIVES = ('causal_lm', 'masked_lm')
END_OF_TEXT = '<|endoftext|>'
# GPT-2 has one special token; WordPiece and char vocabularies also need an
# unknown token for text outside the training alphabet.
CAUSAL_SPECIAL_TOKENS = (END_OF_TEXT, '[UNK]')
MASKED_SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
FILENAME = 'tokenizer.json'

# The names each role goes by in BERT/GPT-2 and in RoBERTa-style files.
_ROLE_NAMES = {
    'eot': (END_OF_TEXT, '</s>'),
    'pad': ('[PAD]', '<pad>'),
    'unk': ('[UNK]', '<unk>'),
    'cls': ('[CLS]', '<s>'),
    'sep': ('[SEP]', '</s>'),
    'mask': ('[MASK]', '<mask>'),
}


class Tokenizer(abc.ABC):
  """Text <-> ids, with the special tokens the packing and masking need.

  Attributes:
    kind: 'bpe', 'wordpiece', 'char' (or another Hugging Face model type).
    vocab_size: number of ids, special tokens included.
    special_ids: sorted ids of every special token (never masked, never a
      random replacement).
    eot_id, pad_id, unk_id, cls_id, sep_id, mask_id: ids of those roles, or
      None when the vocabulary has no such token (pad falls back to eot).
  """

  def __init__(self, kind: str, vocab_size: int, specials: dict[str, int]):
    self.kind = kind
    self.vocab_size = vocab_size
    self.special_ids = tuple(sorted(specials.values()))
    role = {name: next((specials[n] for n in names if n in specials), None)
            for name, names in _ROLE_NAMES.items()}
    self.eot_id, self.unk_id = role['eot'], role['unk']
    self.cls_id, self.sep_id, self.mask_id = role['cls'], role['sep'], role['mask']
    self.pad_id = role['pad'] if role['pad'] is not None else role['eot']

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """The ids of `text`, without any special token added."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of every text."""
    return [self.encode(text) for text in texts]

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`; special tokens are written out."""

  @abc.abstractmethod
  def to_json(self) -> str:
    """The file contents that `load_tokenizer` reads back into this tokenizer."""

  def save(self, path: str | os.PathLike) -> None:
    """Writes `to_json()` to `path` atomically (other processes may read it)."""
    temporary = f'{path}.tmp{os.getpid()}'
    with open(temporary, 'w', encoding='utf-8') as f:
      f.write(self.to_json())
    os.replace(temporary, path)

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.kind}, vocab_size={self.vocab_size})'


class HuggingFaceTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` (trained here or loaded from a tokenizer.json)."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    # A user's file may pad, truncate or add [CLS]/[SEP] itself: the text
    # pipeline packs sequences, so encode exactly the text and nothing else.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    self._tokenizer = tokenizer
    model_type = json.loads(tokenizer.to_str())['model']['type']
    specials = {token.content: i for i, token in tokenizer.get_added_tokens_decoder().items()
                if token.special}
    super().__init__(model_type.lower(), tokenizer.get_vocab_size(with_added_tokens=True),
                     specials)

  def encode(self, text: str) -> list[int]:
    """The ids of `text`, without any special token added."""
    return self._tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of every text, in parallel threads."""
    return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`; special tokens are written out."""
    return self._tokenizer.decode(list(ids), skip_special_tokens=False)

  def to_json(self) -> str:
    """The Hugging Face tokenizer.json contents."""
    return self._tokenizer.to_str()


class CharTokenizer(Tokenizer):
  """One id per character: the special tokens first, then the sorted alphabet."""

  def __init__(self, special_tokens: Sequence[str], characters: str):
    self._special_tokens = tuple(special_tokens)
    self._characters = characters
    self._pieces = self._special_tokens + tuple(characters)
    self._index = {c: i for i, c in enumerate(characters, start=len(self._special_tokens))}
    specials = {token: i for i, token in enumerate(self._special_tokens)}
    super().__init__('char', len(self._pieces), specials)

  def encode(self, text: str) -> list[int]:
    """The ids of `text`; characters outside the alphabet become [UNK]."""
    unknown = self.unk_id
    if unknown is None:
      missing = set(text) - self._index.keys()
      if missing:
        raise ValueError(f'characters {sorted(missing)[:10]} are not in the vocabulary')
    return [self._index.get(c, unknown) for c in text]

  def decode(self, ids: Sequence[int]) -> str:
    """The text of `ids`; special tokens are written out."""
    return ''.join(self._pieces[i] for i in ids)

  def to_json(self) -> str:
    """{'type': 'char', 'special_tokens': [...], 'characters': '...'} as JSON."""
    return json.dumps({'type': 'char', 'special_tokens': list(self._special_tokens),
                       'characters': self._characters}, ensure_ascii=False, indent=1)


# ----------------------------------------------------------------- train ---


def special_tokens_for(objective: str) -> tuple[str, ...]:
  """The special tokens a tokenizer trained for `objective` starts its vocabulary with."""
  if objective not in OBJECTIVES:
    raise DataError(f'config.data.objective={objective!r}; expected one of {OBJECTIVES}')
  return CAUSAL_SPECIAL_TOKENS if objective == 'causal_lm' else MASKED_SPECIAL_TOKENS


def train_tokenizer(kind: str, texts: Iterable[str], *, vocab_size: int,
                    objective: str) -> Tokenizer:
  """Trains a 'bpe', 'wordpiece' or 'char' tokenizer on `texts`, deterministically.

  `texts` may be a stream that is read more than once (WordPiece reads it
  twice); no kind holds all of it in memory.
  """
  specials = special_tokens_for(objective)
  if kind == 'char':
    alphabet = set()
    for text in texts:
      alphabet.update(text)
    return CharTokenizer(specials, ''.join(sorted(alphabet)))
  if kind == 'bpe':
    return HuggingFaceTokenizer(_train_byte_level_bpe(texts, vocab_size, specials))
  if kind == 'wordpiece':
    return HuggingFaceTokenizer(_train_wordpiece(texts, vocab_size, specials))
  raise DataError(f'config.data.tokenizer={kind!r}; expected one of {KINDS} or a path to a '
                  'tokenizer.json')


def _train_byte_level_bpe(texts: Iterable[str], vocab_size: int,
                          specials: Sequence[str]) -> tokenizers.Tokenizer:
  """GPT-2's scheme: BPE over UTF-8 bytes after GPT-2's regex split."""
  if END_OF_TEXT in specials:
    specials = [END_OF_TEXT]  # Bytes cover all text: no [UNK] needed.
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, special_tokens=list(specials),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(texts, trainer)
  return tokenizer


def _train_wordpiece(texts: Iterable[str], vocab_size: int,
                     specials: Sequence[str]) -> tokenizers.Tokenizer:
  """BERT's scheme (uncased): WordPiece learned by BPE merges with `##` continuations."""
  normalizer = normalizers.BertNormalizer(lowercase=True)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  # The trainer numbers each `##c` in hash-map order, and ids break ties
  # between equally frequent merges, so its vocabulary differs from run to
  # run. Numbering every `##c` up front (as a trainer special token, in
  # sorted order) makes training deterministic; they stay plain vocabulary.
  continuations = set()
  for text in texts:
    for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
      continuations.update(word[1:])
  trainer = trainers.WordPieceTrainer(
      vocab_size=vocab_size, show_progress=False,
      special_tokens=list(specials) + ['##' + c for c in sorted(continuations)])
  trained = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
  trained.normalizer = normalizer
  trained.pre_tokenizer = pre_tokenizer
  trained.train_from_iterator(texts, trainer)

  vocab = json.loads(trained.to_str())['model']['vocab']
  unknown = '[UNK]' if '[UNK]' in specials else specials[0]
  tokenizer = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=unknown))
  tokenizer.normalizer = normalizer
  tokenizer.pre_tokenizer = pre_tokenizer
  tokenizer.decoder = decoders.WordPiece()
  tokenizer.add_special_tokens(list(specials))
  return tokenizer


# ------------------------------------------------------------------ load ---


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Reads a Hugging Face tokenizer.json or a char tokenizer file written by `save`."""
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except OSError as e:
    raise DataError(f'Cannot read tokenizer file {str(path)!r}: {e}; expected a Hugging Face '
                    f'tokenizer.json or config.data.tokenizer one of {KINDS}') from e
  try:
    contents = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f'Tokenizer file {str(path)!r} is not JSON: {e}') from e
  if isinstance(contents, dict) and contents.get('type') == 'char':
    return CharTokenizer(contents['special_tokens'], contents['characters'])
  try:
    return HuggingFaceTokenizer(tokenizers.Tokenizer.from_str(text))
  except Exception as e:  # tokenizers raises a bare Exception on malformed files.
    raise DataError(f'{str(path)!r} is not a Hugging Face tokenizer.json: {e}') from e


def check_special_tokens(tokenizer: Tokenizer, objective: str, where: str) -> None:
  """Raises DataError unless `tokenizer` has the special tokens `objective` packs with."""
  needed = {'causal_lm': {'eot': END_OF_TEXT},
            'masked_lm': {'cls': '[CLS]', 'sep': '[SEP]', 'mask': '[MASK]', 'pad': '[PAD]'}}
  missing = [name for role, name in needed[objective].items()
             if getattr(tokenizer, f'{role}_id') is None]
  if missing:
    raise DataError(f'The tokenizer {where} has no special token {missing} (or its RoBERTa '
                    f'spelling), which config.data.objective={objective!r} needs')


def tokenizer_for_run(data: ml_collections.ConfigDict, workdir: str | os.PathLike | None,
                      train_texts: Callable[[], Iterable[str]]) -> Tokenizer:
  """WORKDIR/tokenizer.json if it exists; else loads or trains `data.tokenizer` and saves it.

  `train_texts()` is called only when a tokenizer has to be trained; it must
  return the training split alone, as an iterable that can be read twice.
  """
  saved = None if workdir is None else os.path.join(workdir, FILENAME)
  spec = data.tokenizer
  if saved is not None and os.path.exists(saved):
    tokenizer = load_tokenizer(saved)
    if spec in KINDS and tokenizer.kind != spec:
      raise DataError(f'{saved} holds a {tokenizer.kind} tokenizer but config.data.tokenizer='
                      f'{spec!r}; use a new --workdir, or remove the file to retrain')
    if (spec not in KINDS and os.path.exists(spec)
        and tokenizer.to_json() != load_tokenizer(spec).to_json()):
      raise DataError(f'{saved} differs from config.data.tokenizer={spec!r}; this workdir was '
                      'started with another tokenizer: use a new --workdir')
  elif spec in KINDS:
    tokenizer = train_tokenizer(spec, train_texts(), vocab_size=data.vocab_size,
                                objective=data.objective)
  else:
    tokenizer = load_tokenizer(spec)
  check_special_tokens(tokenizer, data.objective, saved or spec)
  if saved is not None and not os.path.exists(saved):
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(saved)
  return tokenizer
