"""What the two language methods (gpt.py, bert.py) share: text data, the transformer, FLOPs.

The train stream and held-out batches are the text pipeline's
(`ssl_jax/data/text.py`, built by `ssl_jax/data/streams.py` from
`data_spec`); the model is a `TransformerLM` built from `config.model`. Its
vocabulary is the tokenizer's, which exists only once the train data has
trained or loaded it: the data hands the size to the trainer as
`model.vocab_size` (unless the config sets it, e.g. nanoGPT's 50304, a
multiple of 64 above GPT-2's 50257), so config.json records it and `build`
never needs the data. The whole language model is the exported
"encoder": the sampler and a downstream fine-tune want its head too.

Config keys read from `config.model`: vocab_size (None: the tokenizer's),
max_len, width, depth, num_heads, mlp_dim, dropout_rate, dtype, remat, and
the architecture switches gelu ('tanh' | 'erf') and use_bias (biases in every
Linear and LayerNorm), which default to the paper's when a config (or an
older config.json) leaves them out.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ssl_jax.data.streams import DataSpec
from ssl_jax.errors import ConfigError
from ssl_jax.methods.base import Method
from ssl_jax.models import lm
from ssl_jax.models.lm import TransformerConfig, TransformerLM


class LanguageModelMethod(Method):
  """Base of GPT and BERT: subclasses set `objective` and `architecture`, and the loss."""

  throughput_unit = 'tokens'
  objective = ''  # config.data.objective this method trains: 'causal_lm' or 'masked_lm'.
  architecture = staticmethod(lm.gpt2_config)  # -> the paper's TransformerConfig.

  @classmethod
  def data_spec(cls, config: ml_collections.ConfigDict) -> DataSpec:
    """Token windows packed for this method's objective (`ssl_jax/data/text.py`)."""
    del config
    return DataSpec('text', objective=cls.objective)

  def examples_to_units(self, batch_size: int) -> int:
    """Tokens in a batch of `batch_size` windows."""
    return batch_size * self.config.data.seq_len

  # ----------------------------------------------------------------------------
  # Model.
  # ----------------------------------------------------------------------------
  def transformer_config(self) -> TransformerConfig:
    """The architecture: the paper's (`architecture`) with the sizes of `config.model`."""
    m = self.config.model
    if m.vocab_size is None:
      raise ConfigError('config.model.vocab_size is unset: it is the tokenizer\'s, which '
                        'the train data reports to the trainer (or set it explicitly)')
    switches = {key: m[key] for key in ('gelu', 'use_bias') if key in m}
    return self.architecture(
        vocab_size=m.vocab_size, max_len=m.max_len, width=m.width, depth=m.depth,
        num_heads=m.num_heads, mlp_dim=m.mlp_dim, dropout_rate=m.dropout_rate,
        dtype=jnp.dtype(m.dtype), remat=m.remat, **switches)

  def build(self, rngs: nnx.Rngs) -> TransformerLM:
    """The language model of `config.model`."""
    return TransformerLM(self.transformer_config(), rngs=rngs)

  def encoder(self, model: TransformerLM) -> TransformerLM:
    """The whole language model, head included."""
    return model

  def build_encoder(self, rngs: nnx.Rngs) -> TransformerLM:
    """A freshly initialised language model of the exported shape."""
    return self.build(rngs)

  def dropout_rng(self, rng: jax.Array) -> jax.Array | None:
    """The step's key when the config asks for dropout, else None (deterministic)."""
    return rng if self.config.model.dropout_rate > 0 else None

  # ----------------------------------------------------------------------------
  # FLOPs for MFU.
  # ----------------------------------------------------------------------------
  def predicted_positions(self) -> int:
    """Positions per window at which the output head runs."""
    return self.config.data.seq_len

  def matmul_params(self) -> tuple[int, int]:
    """(body, head): the parameters each token multiplies, and those of the output head.

    Position and token-type embeddings are lookups and not counted; the tied
    token embedding is counted once, as the output layer (nanoGPT's N).
    """
    c = self.transformer_config()
    d, m, v = c.width, c.mlp_dim, c.vocab_size
    norm = 2 * d if c.use_bias else d  # A LayerNorm's scale (and bias).
    biases = 5 * d + m if c.use_bias else 0  # qkv 3d, proj d, MLP m and d.
    block = 4 * d * d + 2 * d * m + biases + 2 * norm
    body = c.depth * block + norm  # + GPT's final / BERT's embedding LayerNorm.
    transform = d * d + norm + (d + v if c.use_bias else 0)  # BERT's dense, norm, biases.
    head = v * d + (transform if c.head == 'mlm' else 0)
    return body, head

  def train_flops_per_example(self) -> float:
    """6 N T + 12 depth T^2 width per window, as nanoGPT's estimate_mfu and PaLM count.

    The head's share of N runs only at `predicted_positions`.
    """
    body, head = self.matmul_params()
    c, seq_len = self.config.model, self.config.data.seq_len
    matmuls = 6 * (body * seq_len + head * self.predicted_positions())
    return float(matmuls + 12 * c.depth * seq_len ** 2 * c.width)


def token_accuracy(logits: jax.Array, labels: jax.Array,
                   weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weights where argmax(logits) == label, sum of weights)."""
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  return jnp.sum(correct * weights), jnp.sum(weights)

