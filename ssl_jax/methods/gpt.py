"""GPT next-token prediction (Radford et al. 2019, GPT-2), as nanoGPT trains it.

A causal, pre-LN transformer reads a window of T tokens and predicts, at
every position t, token t+1: the loss is the mean cross-entropy over the
window's next-token pairs (`losses.next_token_loss`), padding excluded.
Windows are packed from the token stream with <|endoftext|> between
documents (`ssl_jax/data/text.py`); dropout (0 in the GPT-2 reproduction,
0.2 in nanoGPT's character-level run) uses the step's key.
Sampling from a trained run: `python -m ssl_jax.sample --workdir=DIR`.
"""

import jax
import jax.numpy as jnp

from ssl_jax import losses
from ssl_jax.methods.base import Batch, Metrics
from ssl_jax.methods.language import LanguageModelMethod
from ssl_jax.models import lm
from ssl_jax.models.lm import TransformerLM


def predicting_logits(model: TransformerLM, hidden: jax.Array) -> jax.Array:
  """(B, T, D) final hidden states -> (B, T-1, V) logits of the positions that have a target.

  The model's own (B, T, V) `logits` go unused, so jit never computes them.
  Slicing the logits instead would make their gradient a pad back to T
  positions, a pass over the whole (B, T, V) array: 4.8 ms of GPT-2 124M's
  142 ms step on an H200 (docs/benchmarks.md, "One GPU").
  """
  return model.logits(hidden[:, :-1])


class GPT(LanguageModelMethod):
  """The GPT method: a causal language model on packed token windows."""

  objective = 'causal_lm'
  capabilities = frozenset({'held_out'})
  architecture = staticmethod(lm.gpt2_config)

  def loss_fn(self, model: TransformerLM, batch: Batch, rng: jax.Array,
              step: jax.Array) -> tuple[jax.Array, Metrics]:
    """Mean next-token cross-entropy (nats) over the batch's counted targets."""
    del step
    hidden = model(batch['tokens'], dropout_rng=self.dropout_rng(rng))['hidden']
    return losses.next_token_loss(predicting_logits(model, hidden), batch['tokens'],
                                  batch['weights']), {}

  def loss_weight(self, batch: Batch) -> jax.Array:
    """The counted targets (packed windows can hold padding)."""
    return batch['weights'][:, 1:].sum().astype(jnp.float32)

  def eval_step(self, model: TransformerLM, batch: Batch) -> dict[str, tuple]:
    """{'loss': (summed next-token cross-entropy, number of targets)}, without dropout."""
    logits = predicting_logits(model, model(batch['tokens'])['hidden'])
    count = batch['weights'][:, 1:].sum()  # weights[:, 0] is never a target.
    return {'loss': (losses.next_token_loss(logits, batch['tokens'], batch['weights']) * count,
                     count)}
