"""One transformer language model for GPT-2 (causal, pre-LN) and BERT (bidirectional, post-LN).

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

The fused qkv kernel (D, 3, heads, head_dim) is laid out like GPT-2's
`c_attn` weight (D, 3D) reshaped, so checkpoints map by reshape alone. Every
parameter carries logical axis names (`vocab`, `embed`, `mlp`, `heads`,
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
from ssl_jax.models.vit import partitioned

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
  remat: bool = False

  def __post_init__(self):
    choices = {'norm': ('pre', 'post'), 'gelu': ('tanh', 'erf'), 'head': ('tied', 'mlm')}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ConfigError(f'transformer {name}={getattr(self, name)!r} is not one of {allowed}')
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


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `rng` is None or `rate` is 0."""
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def split_rng(rng: jax.Array | None, num: int) -> list[jax.Array | None]:
  """`num` independent keys from `rng`, or `num` Nones when there is no rng."""
  return [None] * num if rng is None else list(jax.random.split(rng, num))


def layer_norm(config: TransformerConfig, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm with the config's eps (and bias); exact variance (BERT's eps 1e-12 is tiny)."""
  return nnx.LayerNorm(
      config.width, epsilon=config.layer_norm_eps, use_fast_variance=False,
      use_bias=config.use_bias, dtype=config.dtype, rngs=rngs,
      scale_init=partitioned(nnx.initializers.ones, 'embed'),
      bias_init=partitioned(nnx.initializers.zeros, 'embed'))


def residual_std(config: TransformerConfig) -> float:
  """Init std of projections that write into the residual stream (GPT-2 paper, Sec. 2.3)."""
  if config.scale_residual_init:
    return config.init_std / math.sqrt(2 * config.depth)
  return config.init_std


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection and an optional KV cache."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    heads, head_dim = config.num_heads, config.width // config.num_heads
    normal = nnx.initializers.normal
    self.qkv = nnx.Einsum(
        'btd,dkhe->btkhe', (config.width, 3, heads, head_dim),
        (3, heads, head_dim) if config.use_bias else None,
        kernel_init=partitioned(normal(config.init_std), 'embed', None, 'heads', 'kv'),
        bias_init=partitioned(nnx.initializers.zeros, None, 'heads', 'kv'),
        dtype=config.dtype, rngs=rngs)
    self.proj = nnx.Einsum(
        'bthe,hed->btd', (heads, head_dim, config.width),
        (config.width,) if config.use_bias else None,
        kernel_init=partitioned(normal(residual_std(config)), 'heads', 'kv', 'embed'),
        bias_init=partitioned(nnx.initializers.zeros, 'embed'),
        dtype=config.dtype, rngs=rngs)
    self.dropout_rate = config.dropout_rate

  def __call__(self, x: jax.Array, mask: jax.Array, *, cache: dict | None = None,
               index: jax.Array | int = 0,
               dropout_rng: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
    """(B, T, D), mask (B|1, 1, T, S) -> (B, T, D) and the updated cache.

    Without a cache S = T. With one, the T new keys and values are written
    at positions [index, index + T) of the (B, S, heads, head_dim) cache and
    the queries attend over all S cached positions that `mask` allows.
    """
    qkv = self.qkv(x)  # (B, T, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if cache is not None:
      start = (0, index, 0, 0)
      k = jax.lax.dynamic_update_slice(cache['key'], k.astype(cache['key'].dtype), start)
      v = jax.lax.dynamic_update_slice(cache['value'], v.astype(cache['value'].dtype), start)
      cache = {'key': k, 'value': v}
    q = q * (q.shape[-1] ** -0.5)
    logits = jnp.einsum('bqhe,bkhe->bhqk', q, k).astype(jnp.float32)  # (B, heads, T, S)
    # A finite fill keeps a fully masked row (all padding) from becoming NaN.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    weights = dropout(weights, self.dropout_rate, dropout_rng)
    out = jnp.einsum('bhqk,bkhe->bqhe', weights, v)  # (B, T, heads, head_dim)
    return self.proj(out), cache


class Mlp(nnx.Module):
  """Feed-forward block: Linear -> GELU -> Linear."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    normal = nnx.initializers.normal
    self.fc1 = nnx.Linear(
        config.width, config.mlp_dim, use_bias=config.use_bias, dtype=config.dtype, rngs=rngs,
        kernel_init=partitioned(normal(config.init_std), 'embed', 'mlp'),
        bias_init=partitioned(nnx.initializers.zeros, 'mlp'))
    self.fc2 = nnx.Linear(
        config.mlp_dim, config.width, use_bias=config.use_bias, dtype=config.dtype, rngs=rngs,
        kernel_init=partitioned(normal(residual_std(config)), 'mlp', 'embed'),
        bias_init=partitioned(nnx.initializers.zeros, 'embed'))
    self.approximate_gelu = config.gelu == 'tanh'

  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, T, D) -> (B, T, D)."""
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=self.approximate_gelu))


class Block(nnx.Module):
  """Pre-LN (x + f(norm(x))) or post-LN (norm(x + f(x))) transformer block."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.norm1 = layer_norm(config, rngs=rngs)
    self.attn = Attention(config, rngs=rngs)
    self.norm2 = layer_norm(config, rngs=rngs)
    self.mlp = Mlp(config, rngs=rngs)
    self.pre_norm = config.norm == 'pre'
    self.dropout_rate = config.dropout_rate

  def __call__(self, x: jax.Array, mask: jax.Array, *, cache: dict | None = None,
               index: jax.Array | int = 0,
               dropout_rng: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
    """(B, T, D) -> (B, T, D) and the updated cache; dropout where HF GPT-2/BERT have it."""
    attn_rng, attn_out_rng, mlp_out_rng = split_rng(dropout_rng, 3)
    rate = self.dropout_rate
    if self.pre_norm:
      attended, cache = self.attn(self.norm1(x), mask, cache=cache, index=index,
                                  dropout_rng=attn_rng)
      x = x + dropout(attended, rate, attn_out_rng)
      x = x + dropout(self.mlp(self.norm2(x)), rate, mlp_out_rng)
    else:
      attended, cache = self.attn(x, mask, cache=cache, index=index, dropout_rng=attn_rng)
      x = self.norm1(x + dropout(attended, rate, attn_out_rng))
      x = self.norm2(x + dropout(self.mlp(x), rate, mlp_out_rng))
    return x, cache


class TransformerLM(nnx.Module):
  """Token + position (+ type) embeddings, blocks, and a tied language-model head."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, width = config.dtype, config.width
    normal = nnx.initializers.normal(config.init_std)
    self.token_embed = nnx.Embed(
        config.vocab_size, width, dtype=dtype, rngs=rngs,
        embedding_init=partitioned(normal, 'vocab', 'embed'))
    self.position_embed = nnx.Embed(
        config.max_len, width, dtype=dtype, rngs=rngs,
        embedding_init=partitioned(normal, None, 'embed'))
    self.type_embed = nnx.Embed(
        config.type_vocab_size, width, dtype=dtype, rngs=rngs,
        embedding_init=partitioned(normal, None, 'embed')) if config.type_vocab_size else None
    self.embed_norm = layer_norm(config, rngs=rngs) if config.embed_norm else None
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
    self.final_norm = layer_norm(config, rngs=rngs) if config.norm == 'pre' else None
    if config.head == 'mlm':
      self.mlm_dense = nnx.Linear(
          width, width, use_bias=config.use_bias, dtype=dtype, rngs=rngs,
          kernel_init=partitioned(normal, 'embed', None),
          bias_init=partitioned(nnx.initializers.zeros, None))
      self.mlm_norm = layer_norm(config, rngs=rngs)
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
    x = self.token_embed(tokens) + self.position_embed(positions)[None]  # (B, T, D)
    if self.type_embed is not None:
      types = jnp.zeros_like(tokens) if token_types is None else token_types
      x = x + self.type_embed(types)
    if self.embed_norm is not None:
      x = self.embed_norm(x)
    return dropout(x, self.config.dropout_rate, dropout_rng)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """(..., D) final hidden states -> (..., V) logits through the tied head.

    BERT's loss reads only the ~15% chosen positions: a method may gather
    those rows of `hidden` and call this on them instead of using the full
    (B, T, V) `logits` of `__call__`, which under jit is then never computed.
    """
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
    length = tokens.shape[1]
    rngs = split_rng(dropout_rng, self.config.depth + 1)
    x = self.embed(tokens, jnp.arange(length), token_types, rngs[-1])
    mask = jnp.ones((1, 1, length, length), bool)
    if self.config.causal:
      mask = jnp.tril(mask)
    if key_mask is not None:
      mask = mask & key_mask.astype(bool)[:, None, None, :]
    for block, rng in zip(self.blocks, rngs[:-1], strict=True):
      if self.config.remat:  # Recompute activations in the backward pass to save memory.
        x, _ = nnx.remat(lambda blk, h, r: blk(h, mask, dropout_rng=r))(block, x, rng)
      else:
        x, _ = block(x, mask, dropout_rng=rng)
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
    for block, layer_cache in zip(self.blocks, cache, strict=True):
      x, layer_cache = block(x, mask, cache=layer_cache, index=index)
      new_cache.append(layer_cache)
    if self.final_norm is not None:
      x = self.final_norm(x)
    return {'hidden': x, 'logits': self.logits(x)}, new_cache


def count_params(model_or_state: Any) -> int:
  """Number of scalars in the `nnx.Param`s of a model or state (abstract ones too)."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(
      model_or_state, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))
