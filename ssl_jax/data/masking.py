"""BERT's masked-LM corruption (Devlin et al. 2018, section 3.1 and appendix A.1).

Every token that is not a special token ([CLS], [SEP], [PAD], [UNK], [MASK])
is chosen independently with probability `mask_prob` (0.15). A chosen token
becomes [MASK] with probability 0.8, a uniformly random non-special id with
0.1, and stays unchanged with 0.1; the model predicts the original id at
every chosen position. Unlike the paper's preprocessing the number chosen per
sequence is not fixed (it is Binomial(n, 0.15)), and a sequence may draw a
fresh corruption every epoch, as in RoBERTa's dynamic masking.

It runs on the host, inside the text pipeline's grain RandomMap, with grain's
rng for each position of the global stream: the corruption of global example
k is a function of (seed, k) alone, so it is reproducible, resumes exactly
from a checkpointed iterator and is the same for any process count.
"""

from collections.abc import Sequence

import numpy as np

MASK_PROB = 0.15
REPLACE_WITH_MASK = 0.8
REPLACE_WITH_RANDOM = 0.1  # The remaining 0.1 keep their token.


def random_ordinary_ids(rng: np.random.Generator, shape: tuple[int, ...] | int,
                        special_ids: Sequence[int], vocab_size: int) -> np.ndarray:
  """Uniform ids in [0, vocab_size) that are never in `special_ids`."""
  specials = np.unique(np.asarray(special_ids, np.int64))
  draws = rng.integers(0, vocab_size - len(specials), size=shape)
  # The r-th ordinary id is r plus the number of special ids at or below it;
  # specials[j] - j counts the ordinary ids below the j-th special one.
  return (draws + np.searchsorted(specials - np.arange(len(specials)), draws,
                                  side='right')).astype(np.int32)


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    special_ids: Sequence[int],
    vocab_size: int,
    mask_prob: float = MASK_PROB,
) -> dict[str, np.ndarray]:
  """BERT's corruption of int `tokens` (any shape).

  Returns:
    {'inputs': int32, the corrupted tokens; 'labels': int32, the original
    tokens; 'weights': float32, 1 at the chosen positions and 0 elsewhere},
    each shaped like `tokens`.
  """
  tokens = np.asarray(tokens, np.int32)
  eligible = ~np.isin(tokens, special_ids)
  chosen = eligible & (rng.random(tokens.shape) < mask_prob)
  action = rng.random(tokens.shape)
  to_mask = chosen & (action < REPLACE_WITH_MASK)
  to_random = chosen & (action >= REPLACE_WITH_MASK) & (
      action < REPLACE_WITH_MASK + REPLACE_WITH_RANDOM)
  inputs = np.where(to_mask, np.int32(mask_id), tokens)
  inputs[to_random] = random_ordinary_ids(rng, int(to_random.sum()), special_ids, vocab_size)
  return {'inputs': inputs, 'labels': tokens, 'weights': chosen.astype(np.float32)}
