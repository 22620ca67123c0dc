"""One transformer language model for GPT-2 (causal, pre-LN) and BERT (bidirectional, post-LN).

The blocks are the shared core's (`ssl_jax.models.transformer.Block`); this
file adds the embeddings, the heads, the masks and the KV-cache decoding.

What follows whom:
- GPT-2 (Radford et al. 2019) as in nanoGPT's `model.py` and Hugging Face's
  `modeling_gpt2.py`: learned positions, pre-LayerNorm blocks with eps 1e-5,
  tanh-approximated GELU, a final LayerNorm, the output head tied to the
  token embedding, N(0, 0.02) init with the residual projections (attention
  output, second MLP layer) scaled by 1/sqrt(2 * depth).
- nanoGPT's own training runs (karpathy/nanoGPT 3adf61e) differ from GPT-2
  in two switches: `use_bias=False` (train.py L56 `bias = False`, read by
  model.py L116: no bias in any Linear or LayerNorm, model.py L18-27, L35-37,
  L82-84) and `gelu='erf'` (model.py L83 `nn.GELU()`, PyTorch's exact form).
- BERT (Devlin et al. 2018) as in Hugging Face's `modeling_bert.py`: word +
  position + token-type embeddings followed by a LayerNorm, post-LayerNorm
  blocks with eps 1e-12, exact (erf) GELU, and the MLM head (dense -> GELU ->
  LayerNorm -> tied decoder + output bias); N(0, 0.02) init, no scaling.
- The KV cache follows the idea of the Flax lm1b example's `decode=True`
  attention (write the new keys/values at the current index, mask the rest),
  but keeps the cache as an explicit pytree argument instead of module state,
  so decoding is a pure function that `jax.jit` and `lax.scan` take as is.

Every parameter carries logical axis names (`vocab`, `embed`, `mlp`, `heads`,
`kv`) that `ssl_jax.sharding` maps onto the (data, fsdp, tensor) mesh:
attention heads, MLP hidden units and the vocabulary split over `tensor`.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ssl_jax.errors import ConfigError
from ssl_jax.models.initializers import normal, partitioned
from ssl_jax.models.regularizers import dropout, split_rng
from ssl_jax.models.remat import policy_name
from ssl_jax.models.transformer import Block, apply_block, layer_norm, over_rows

Cache = list[dict[str, jax.Array]]  # per layer: key and value, each (B, S, heads, head_dim)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of a `TransformerLM`; the defaults are GPT-2 124M."""

  vocab_size: int = 50257
  max_len: int = 1024
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  causal: bool = True
  norm: str = 'pre'  # 'pre' (GPT-2) or 'post' (BERT).
  layer_norm_eps: float = 1e-5
  gelu: str = 'tanh'  # 'tanh' (GPT-2's gelu_new) or 'erf' (BERT, nanoGPT's nn.GELU()).
  use_bias: bool = True  # Biases in every Linear and LayerNorm; False: nanoGPT's bias=False.
  type_vocab_size: int = 0  # Token-type (segment) embeddings; 0 = none.
  embed_norm: bool = False  # LayerNorm after summing the embeddings (BERT).
  head: str = 'tied'  # 'tied' (GPT-2: logits = h E^T) or 'mlm' (BERT's transform head).
  dropout_rate: float = 0.0
  init_std: float = 0.02
  scale_residual_init: bool = True  # std / sqrt(2 depth) on residual projections.
  dtype: Any = 'float32'  # Compute dtype; parameters are always float32.
  remat: Any = False  # A policy of ssl_jax.models.remat ('none', 'full', 'dots', ...) or a bool.
  # 'auto' (cuDNN's fused kernel on GPU in bfloat16/float16 without a padding
  # mask, else XLA), 'xla' or 'cudnn': see transformer.fused_implementation.
  attention_implementation: str = 'auto'

  def __post_init__(self):
    choices = {'norm': ('pre', 'post'), 'gelu': ('tanh', 'erf'), 'head': ('tied', 'mlm')}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ConfigError(f'transformer {name}={getattr(self, name)!r} is not one of {allowed}')
    policy_name(self.remat)  # A bad policy name fails here, naming the key.
    if self.width % self.num_heads:
      raise ConfigError(f'transformer width {self.width} is not divisible by '
                        f'num_heads {self.num_heads}')


def gpt2_config(**overrides: Any) -> TransformerConfig:
  """GPT-2: causal, pre-LN, eps 1e-5, tanh GELU, tied head (defaults are 124M)."""
  return TransformerConfig(**overrides)


def bert_config(**overrides: Any) -> TransformerConfig:
  """BERT: bidirectional, post-LN, eps 1e-12, erf GELU, segments, MLM head (base size)."""
  bert = dict(vocab_size=30522, max_len=512, causal=False, norm='post', layer_norm_eps=1e-12,
              gelu='erf', type_vocab_size=2, embed_norm=True, head='mlm',
              scale_residual_init=False)
  return TransformerConfig(**{**bert, **overrides})


def residual_std(config: TransformerConfig) -> float:
  """Init std of projections that write into the residual stream (GPT-2 paper, Sec. 2.3)."""
  if config.scale_residual_init:
    return config.init_std / math.sqrt(2 * config.depth)
  return config.init_std


def block(config: TransformerConfig, *, rngs: nnx.Rngs) -> Block:
  """The core block as GPT-2 / BERT configure it (norm, eps, GELU, bias, init, dropout)."""
  return Block(config.width, config.num_heads, config.mlp_dim, dtype=config.dtype,
               norm=config.norm, layer_norm_eps=config.layer_norm_eps, gelu=config.gelu,
               use_bias=config.use_bias, kernel_init=normal(config.init_std),
               residual_init=normal(residual_std(config)), dropout_rate=config.dropout_rate,
               implementation=config.attention_implementation, rngs=rngs)


def lm_layer_norm(config: TransformerConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """The core LayerNorm with the config's width, eps and bias."""
  return layer_norm(config.width, eps=config.layer_norm_eps, use_bias=config.use_bias,
                    dtype=config.dtype, rngs=rngs)


def lookup(embed: nnx.Embed, ids: jax.Array) -> jax.Array:
  """Rows `ids` of `embed`'s table, gathered in the table's dtype, then cast to the compute dtype.

  The same values as `embed(ids)`, which casts the whole table first; but the
  gradient, a scatter-add of one row per id into the table, now runs in
  float32. In bfloat16 that scatter took 28 ms of GPT-2 124M's 162 ms step on
  an H200 (batch 64, `benchmarks/gpu_mfu.py`, trace without CUDA graphs).
  """
  rows = jnp.take(embed.embedding[...], ids, axis=0)
  return rows.astype(embed.dtype) if embed.dtype is not None else rows


class TransformerLM(nnx.Module):
  """Token + position (+ type) embeddings, blocks, and a tied language-model head."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, width = config.dtype, config.width
    normal_init = nnx.initializers.normal(config.init_std)
    self.token_embed = nnx.Embed(
        config.vocab_size, width, dtype=dtype, rngs=rngs,
        embedding_init=partitioned(normal_init, 'vocab', 'embed'))
    self.position_embed = nnx.Embed(
        config.max_len, width, dtype=dtype, rngs=rngs,
        embedding_init=partitioned(normal_init, None, 'embed'))
    self.type_embed = nnx.Embed(
        config.type_vocab_size, width, dtype=dtype, rngs=rngs,
        embedding_init=partitioned(normal_init, None, 'embed')) if config.type_vocab_size else None
    self.embed_norm = lm_layer_norm(config, rngs=rngs) if config.embed_norm else None
    self.blocks = nnx.List([block(config, rngs=rngs) for _ in range(config.depth)])
    self.final_norm = lm_layer_norm(config, rngs=rngs) if config.norm == 'pre' else None
    if config.head == 'mlm':
      self.mlm_dense = nnx.Linear(
          width, width, use_bias=config.use_bias, dtype=dtype, rngs=rngs,
          kernel_init=partitioned(normal_init, 'embed', None),
          bias_init=partitioned(nnx.initializers.zeros, None))
      self.mlm_norm = lm_layer_norm(config, rngs=rngs)
      self.mlm_bias = nnx.Param(partitioned(nnx.initializers.zeros, 'vocab')(
          rngs.params(), (config.vocab_size,))) if config.use_bias else None
    else:
      self.mlm_dense = self.mlm_norm = self.mlm_bias = None

  def embed(self, tokens: jax.Array, positions: jax.Array, token_types: jax.Array | None,
            dropout_rng: jax.Array | None = None) -> jax.Array:
    """(B, T) ids at (T,) positions -> (B, T, D) input of the first block."""
    if tokens.shape[1] > self.config.max_len:
      raise ValueError(f'sequence of {tokens.shape[1]} tokens is longer than the model\'s '
                       f'max_len {self.config.max_len}')
    x = lookup(self.token_embed, tokens) + lookup(self.position_embed, positions)[None]
    if self.type_embed is not None:
      types = jnp.zeros_like(tokens) if token_types is None else token_types
      x = x + lookup(self.type_embed, types)
    if self.embed_norm is not None:
      x = self.embed_norm(x)
    return dropout(x, self.config.dropout_rate, dropout_rng)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """(..., D) final hidden states -> (..., V) logits through the tied head.

    BERT's loss reads only the ~15% chosen positions: a method may gather
    those rows of `hidden` and call this on them instead of using the full
    (B, T, V) `logits` of `__call__`, which under jit is then never computed.
    """
    return over_rows(self._logits, hidden)

  def _logits(self, hidden: jax.Array) -> jax.Array:
    """(N, D) rows of final hidden states -> (N, V) logits."""
    if self.mlm_dense is not None:
      approximate = self.config.gelu == 'tanh'
      hidden = self.mlm_norm(jax.nn.gelu(self.mlm_dense(hidden), approximate=approximate))
      if self.mlm_bias is not None:
        return self.token_embed.attend(hidden) + self.mlm_bias[...].astype(hidden.dtype)
    return self.token_embed.attend(hidden)

  def __call__(self, tokens: jax.Array, *, token_types: jax.Array | None = None,
               key_mask: jax.Array | None = None,
               dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """(B, T) token ids -> intermediates `hidden` (B, T, D) and `logits` (B, T, V).

    Args:
      tokens: (B, T) int token ids.
      token_types: optional (B, T) segment ids (models with type embeddings).
      key_mask: optional (B, T), 0 at padding keys nobody may attend to.
      dropout_rng: a PRNG key turns dropout on; None (the default) is
        deterministic, as for evaluation.
    """
    rngs = split_rng(dropout_rng, self.config.depth + 1)
    x = self.embed(tokens, jnp.arange(tokens.shape[1]), token_types, rngs[-1])
    mask = None if key_mask is None else key_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, T)
    for layer, rng in zip(self.blocks, rngs[:-1], strict=True):
      x, _ = apply_block(layer, x, remat=self.config.remat, mask=mask,
                         causal=self.config.causal, dropout_rng=rng, need_weights=False)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return {'hidden': x, 'logits': self.logits(x)}

  def init_cache(self, batch: int, length: int | None = None) -> Cache:
    """Zero KV cache for `batch` sequences of up to `length` (default max_len) tokens."""
    length = self.config.max_len if length is None else length
    if length > self.config.max_len:
      raise ValueError(f'cache length {length} exceeds the model\'s max_len '
                       f'{self.config.max_len}')
    heads = self.config.num_heads
    shape = (batch, length, heads, self.config.width // heads)
    zeros = jnp.zeros(shape, self.config.dtype)
    return [{'key': zeros, 'value': zeros} for _ in range(self.config.depth)]

  def decode(self, tokens: jax.Array, cache: Cache,
             index: jax.Array | int) -> tuple[dict[str, jax.Array], Cache]:
    """Causal incremental forward: (B, T) new tokens at positions index.. -> logits, cache.

    The cache holds the keys and values of positions [0, index); the new
    tokens' are written at [index, index + T). Query i attends to cached
    positions <= index + i, so feeding a sequence in chunks gives the same
    logits as one full forward pass. `index` may be a traced scalar.
    """
    if not self.config.causal:
      raise ValueError('decode needs a causal model; this one is bidirectional')
    length, cache_len = tokens.shape[1], cache[0]['key'].shape[1]
    positions = index + jnp.arange(length)  # (T,)
    x = self.embed(tokens, positions, None)
    mask = jnp.arange(cache_len)[None, :] <= positions[:, None]  # (T, S)
    mask = mask[None, None]
    new_cache = []
    for layer, layer_cache in zip(self.blocks, cache, strict=True):
      x, layer_cache = layer.decode(x, mask, layer_cache, index)
      new_cache.append(layer_cache)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return {'hidden': x, 'logits': self.logits(x)}, new_cache
