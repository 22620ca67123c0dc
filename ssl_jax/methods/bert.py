"""BERT masked language modelling (Devlin et al. 2018, section 3.1).

A bidirectional, post-LN transformer reads a window [CLS] tokens [SEP] in
which the text pipeline chose ~15% of the ordinary tokens (80% replaced by
[MASK], 10% by a random id, 10% kept; `ssl_jax/data/masking.py`) and
predicts the original token at every chosen position: the loss is the mean
cross-entropy over chosen positions (`losses.masked_lm_loss`). There is no
next-sentence task (RoBERTa showed it does not help); windows are packed
across documents (see text.py), so token types are all 0.

The output head (transform + tied decoder over the vocabulary) is most of a
small model's cost and only ~15% of its rows count. As BERT's
`max_predictions_per_seq`, `config.model.max_predictions_per_seq` = k
gathers the chosen positions of each window (in order) and runs the head on
those k rows only; a window with more than k chosen positions loses the
rest from the loss, which `predictions_dropped` reports (choose k ~6
standard deviations above seq_len * mask_prob and it stays 0). None runs
the head everywhere.
"""

import jax
import jax.numpy as jnp

from ssl_jax import losses
from ssl_jax.methods.base import Batch, Metrics
from ssl_jax.methods.language import LanguageModelMethod, token_accuracy
from ssl_jax.models import lm
from ssl_jax.models.lm import TransformerLM


class BERT(LanguageModelMethod):
  """The BERT method: masked-token prediction on packed, corrupted windows."""

  objective = 'masked_lm'
  capabilities = frozenset({'held_out'})
  architecture = staticmethod(lm.bert_config)

  def _max_predictions(self) -> int | None:
    k = self.config.model.max_predictions_per_seq
    return k if k and k < self.config.data.seq_len else None

  def predictions(self, model: TransformerLM, batch: Batch,
                  dropout_rng: jax.Array | None = None):
    """(logits, labels, weights, dropped) at the predicted positions.

    Returns (B, P, V) logits with (B, P) labels and weights, P = seq_len or
    max_predictions_per_seq, and the number of chosen positions left out.
    """
    out = model(batch['inputs'], token_types=batch['token_types'], key_mask=batch['key_mask'],
                dropout_rng=dropout_rng)
    labels, weights = batch['labels'], batch['weights']
    k = self._max_predictions()
    if k is None:
      return out['logits'], labels, weights, jnp.zeros((), jnp.float32)
    # A stable sort of -weights lists each window's chosen positions first, in order;
    # under jit the full (B, T, V) logits of `out` are then never computed.
    order = jnp.argsort(-weights, axis=1, stable=True)[:, :k]  # (B, k)
    hidden = jnp.take_along_axis(out['hidden'], order[..., None], axis=1)  # (B, k, D)
    kept = jnp.take_along_axis(weights, order, axis=1)
    dropped = weights.sum() - kept.sum()
    return model.logits(hidden), jnp.take_along_axis(labels, order, axis=1), kept, dropped

  def loss_fn(self, model: TransformerLM, batch: Batch, rng: jax.Array,
              step: jax.Array) -> tuple[jax.Array, Metrics]:
    """Mean cross-entropy (nats) at the chosen positions; masked-token accuracy."""
    del step
    logits, labels, weights, dropped = self.predictions(model, batch, self.dropout_rng(rng))
    loss = losses.masked_lm_loss(logits, labels, weights)
    correct, count = token_accuracy(logits, labels, weights)
    return loss, {'masked_accuracy': correct / jnp.maximum(count, 1.0),
                  'predictions_dropped': dropped / jnp.maximum(count + dropped, 1.0)}

  def loss_weight(self, batch: Batch) -> jax.Array:
    """The predicted positions: each window's chosen ones, at most max_predictions_per_seq."""
    chosen = batch['weights'].sum(axis=1)  # (B,)
    k = self._max_predictions()
    return (chosen if k is None else jnp.minimum(chosen, k)).sum().astype(jnp.float32)

  def eval_step(self, model: TransformerLM, batch: Batch) -> dict[str, tuple]:
    """Summed loss and correct predictions over the chosen positions, without dropout."""
    logits, labels, weights, _ = self.predictions(model, batch)
    correct, count = token_accuracy(logits, labels, weights)
    return {'loss': (losses.masked_lm_loss(logits, labels, weights) * count, count),
            'masked_accuracy': (correct, count)}

  def predicted_positions(self) -> int:
    """The head runs at max_predictions_per_seq positions (or all)."""
    return self._max_predictions() or self.config.data.seq_len

  def check_metrics(self, scalars: dict[str, float]) -> list[str]:
    """Warns when max_predictions_per_seq leaves chosen tokens out of the loss."""
    dropped = scalars.get('predictions_dropped', 0.0)
    if dropped > 1e-3:
      return [f'{100 * dropped:.2f}% of the masked tokens were left out of the loss: raise '
              f'config.model.max_predictions_per_seq (now {self._max_predictions()})']
    return []
