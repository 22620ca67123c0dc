"""The transformer core shared by the ViT, MAE's decoder, GPT-2 and BERT.

One `Attention` (fused qkv, optional bias, padding masks, causal masking and
a KV cache), one `Mlp` (tanh or erf GELU), one `Block` (pre- or post-norm,
LayerNorm eps, dropout as Hugging Face GPT-2/BERT place it, stochastic depth
as DINO's `drop_path`) and one `Transformer` stack with a final LayerNorm
(the ViT encoder and MAE's decoder, timm's `Block` layout). `lm.py` builds
GPT-2 and BERT from the same blocks; `vit.py` builds the ViT. Callers choose
the initialisers (`ssl_jax.models.initializers`): MAE xavier-uniform, DINO
trunc-normal, GPT/BERT normal(0.02) with GPT-2's residual scaling, passed as
`kernel_init` (qkv, fc1) and `residual_init` (proj, fc2: the layers that
write into the residual stream).

Attention is the softmax of two einsums, which returns the (B, heads, T, S)
weights when the caller needs them (DINO's attention maps, the ViT's
`attention` output); on a GPU with half-precision queries it goes through
cuDNN's fused kernel (`jax.nn.dot_product_attention`) unless the weights or
attention dropout are wanted (`fused_implementation`, `attend`), odd
lengths such as ViT-B's 197 tokens padded by one masked token
(`fused_attention`). The
fused qkv kernel (D, 3, heads, head_dim) is laid out like timm's `qkv` and
GPT-2's `c_attn` weight reshaped, so checkpoints map by reshape alone. Every
parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`).

Per-token layers take the tokens as rows of one matrix (`over_rows`), so a
weight's gradient is one matmul over one axis: over (B, T), XLA:CPU copied
the output gradient transposed, recomputing in each copy the ops producing
it, and GPT's step took 1.7x as long (docs/benchmarks.md).

The language model (`TransformerLM`, `TransformerConfig`, `gpt2_config`,
`bert_config`) is in `lm.py`.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from ssl_jax.errors import ConfigError
from ssl_jax.models.initializers import KernelInit, partitioned, xavier_uniform
from ssl_jax.models.regularizers import drop_path, drop_path_rates, dropout, split_rng
from ssl_jax.models.remat import checkpointed, policy_name

Dtype = Any


def layer_norm(width: int, *, eps: float = 1e-6, use_bias: bool = True, dtype: Dtype,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm with sharded scale/bias and exact variance (BERT's eps 1e-12 is tiny)."""
  return nnx.LayerNorm(
      width, epsilon=eps, use_fast_variance=False, use_bias=use_bias, dtype=dtype, rngs=rngs,
      scale_init=partitioned(nnx.initializers.ones, 'embed'),
      bias_init=partitioned(nnx.initializers.zeros, 'embed'))


def over_rows(fn: Any, x: jax.Array, feature_dims: int = 1) -> Any:
  """`fn` applied to `x` with its leading axes flattened into one row axis, then restored.

  (B, T, F...) -> fn((B*T, F...)) of shape (B*T, G...) -> (B, T, G...), where
  `feature_dims` is the number of trailing F axes (see the module docstring);
  each array of a tuple `fn` returns is restored alike.
  """
  lead = x.shape[:x.ndim - feature_dims]
  y = fn(x.reshape((math.prod(lead),) + x.shape[x.ndim - feature_dims:]))
  return jax.tree.map(lambda a: a.reshape(lead + a.shape[1:]), y)


def matmul_rows(x: jax.Array, kernel: jax.Array, bias: jax.Array | None,
                in_axes: int) -> jax.Array:
  """(N, *kernel.shape[:in_axes]) rows times `kernel` as one 2-D matmul, plus `bias`.

  -> (N, *kernel.shape[in_axes:]). Its weight gradient copies no operand
  transposed, as an einsum over several kernel axes makes XLA:CPU do.
  """
  fan_in = math.prod(kernel.shape[:in_axes])
  y = x.reshape(x.shape[0], fan_in) @ kernel.reshape(fan_in, -1)
  if bias is not None:
    y = y + bias.reshape(-1)
  return y.reshape(x.shape[:1] + kernel.shape[in_axes:])


def promoted(layer: nnx.Einsum, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """`x`, `layer`'s kernel and bias (None without one) in its dtype, as its own call does."""
  bias = layer.bias[...] if layer.bias is not None else None
  return layer.promote_dtype((x, layer.kernel[...], bias), dtype=layer.dtype)


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None, *,
                      causal: bool = False) -> jax.Array:
  """Queries (B, T, heads, E), keys (B, S, heads, E) -> float32 softmax weights (B, heads, T, S).

  `mask` (broadcastable to (B, heads, T, S), True = may attend) and `causal`
  (query i sees keys <= i) combine. A finite fill keeps a fully masked row
  (all padding) from becoming NaN: it attends uniformly, as jax.nn.dot_product_attention does.
  """
  q = q * (q.shape[-1] ** -0.5)
  logits = jnp.einsum('bqhe,bkhe->bhqk', q, k).astype(jnp.float32)
  if causal:
    causal_mask = jnp.tril(jnp.ones(logits.shape[-2:], bool))
    mask = causal_mask if mask is None else mask & causal_mask
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')


def fused_implementation(q: jax.Array, mask: jax.Array | None, implementation: str) -> str:
  """The attention kernel to use for `implementation`: 'cudnn' or 'xla'.

  'auto' picks cuDNN's fused (flash) kernel where it applies, on a GPU with
  bfloat16/float16 queries and no explicit mask (causal or none: GPT-2, the
  ViT, MAE's decoder); it never materialises the (B, heads, T, S) scores.
  Elsewhere (CPU, TPU, float32, BERT's padding masks) 'xla': the softmax of
  two einsums (`attention_weights`), which XLA fuses as it sees fit.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ConfigError(f'attention implementation {implementation!r} is not one of '
                      f'{IMPLEMENTATIONS}')
  if implementation != 'auto':
    return implementation
  if (jax.default_backend() == 'gpu' and mask is None
      and q.dtype in (jnp.bfloat16, jnp.float16)):
    return 'cudnn'
  return 'xla'


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
                    causal: bool, implementation: str | None) -> jax.Array:
  """`jax.nn.dot_product_attention`; without a mask, an odd length is padded by one token.

  jax refuses cuDNN's fused kernel for odd sequence lengths when
  differentiated, as if a bias were given, even when none is:
  `dot_product_attention` puts a zeros(0) placeholder in `bias` and
  `_dot_product_attention_fwd_rule` then checks `bias is not None`
  (jax/_src/cudnn/fused_attention_stablehlo.py, jax 0.10.2 L1927-L1929 and
  L451-L453; a training rule with a bias wants even lengths, L391-L395). On an
  H200 with jax 0.11.2, ViT-B's 197 tokens (MAE's decoder) fell back to XLA
  for this. So an odd length gets one zero token, which the kernel's padding
  mask (`query_seq_lengths`, `key_value_seq_lengths`) hides from every query,
  and its output row is dropped: the same attention over the real tokens.
  Only on one device: jax's partitioning rule for the kernel gives the
  length arrays no sharding of their own (`_fwd_shardy_rule`: "placeholders
  for the remaining args"), and whether a batch-sharded call then compiles
  was not checked (one GPU was lent); there, odd lengths stay on XLA's path.
  """
  t, s = q.shape[1], k.shape[1]
  if mask is not None or (t % 2 == 0 and s % 2 == 0) or jax.device_count() > 1:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                        implementation=implementation)

  def even(x: jax.Array) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))

  def lengths(n: int) -> jax.Array:
    return jnp.full((q.shape[0],), n, jnp.int32)

  out = jax.nn.dot_product_attention(
      even(q), even(k), even(v), is_causal=causal, query_seq_lengths=lengths(t),
      key_value_seq_lengths=lengths(s), implementation=implementation)
  return out[:, :t]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, *,
           causal: bool = False, need_weights: bool = False, dropout_rate: float = 0.0,
           dropout_rng: jax.Array | None = None,
           implementation: str = 'auto') -> tuple[jax.Array, jax.Array | None]:
  """Scaled dot-product attention: (B, T, heads, E) -> ((B, T, heads, E), weights or None).

  cuDNN's fused kernel (`jax.nn.dot_product_attention`) where
  `fused_implementation` picks it and neither the weights nor attention
  dropout (it has none) are wanted; with 'auto', a kernel that refuses the
  shapes when traced (head size, cuDNN version) falls back, with a log line.
  Otherwise the explicit softmax, whose weights (before dropout) come back as
  (B, heads, T, S) when `need_weights`; faster on XLA:CPU than
  jax.nn.dot_product_attention's XLA kernel (benchmarks/attention_bench.py).
  """
  fusable = not need_weights and (dropout_rng is None or dropout_rate == 0.0)
  if fusable and fused_implementation(q, mask, implementation) == 'cudnn':
    try:
      return fused_attention(q, k, v, mask, causal=causal, implementation='cudnn'), None
    except Exception as e:  # noqa: BLE001  (only an 'auto' choice of cuDNN falls back)
      if implementation != 'auto':
        raise
      logging.log_first_n(logging.WARNING, 'cuDNN attention unavailable (%s); using XLA.', 1, e)
  weights = attention_weights(q, k, mask, causal=causal).astype(v.dtype)
  dropped = dropout(weights, dropout_rate, dropout_rng)
  return jnp.einsum('bhqk,bkhe->bqhe', dropped, v), weights if need_weights else None


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection and an optional KV cache."""

  def __init__(self, width: int, num_heads: int, *, dtype: Dtype = jnp.float32,
               use_bias: bool = True, kernel_init: KernelInit = xavier_uniform,
               residual_init: KernelInit | None = None, dropout_rate: float = 0.0,
               implementation: str = 'auto', rngs: nnx.Rngs):
    if width % num_heads:
      raise ConfigError(f'width {width} is not divisible by num_heads {num_heads}')
    head_dim = width // num_heads
    residual_init = residual_init or kernel_init
    self.qkv = nnx.Einsum(
        'btd,dkhe->btkhe', (width, 3, num_heads, head_dim),
        (3, num_heads, head_dim) if use_bias else None,
        kernel_init=partitioned(kernel_init(0, (1, 2, 3)), 'embed', None, 'heads', 'kv'),
        bias_init=partitioned(nnx.initializers.zeros, None, 'heads', 'kv'),
        dtype=dtype, rngs=rngs)
    self.proj = nnx.Einsum(
        'bthe,hed->btd', (num_heads, head_dim, width), (width,) if use_bias else None,
        kernel_init=partitioned(residual_init((0, 1), 2), 'heads', 'kv', 'embed'),
        bias_init=partitioned(nnx.initializers.zeros, 'embed'),
        dtype=dtype, rngs=rngs)
    self.dropout_rate = dropout_rate
    self.implementation = implementation  # 'auto', 'xla' or 'cudnn': see fused_implementation.

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, causal: bool = False,
               dropout_rng: jax.Array | None = None,
               need_weights: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """(B, T, D), mask (B|1, 1, T, T) -> ((B, T, D), weights (B, heads, T, T) or None).

    As torch's nn.MultiheadAttention, the weights are returned unless
    `need_weights=False`, which lets the fused kernel run.
    """
    q, k, v = over_rows(self.project_qkv, x)  # 3 x (B, T, heads, head_dim)
    out, weights = attend(q, k, v, mask, causal=causal,
                          need_weights=need_weights, dropout_rate=self.dropout_rate,
                          dropout_rng=dropout_rng, implementation=self.implementation)
    return over_rows(self.project_out, out, 2), weights

  def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(N, D) token rows -> queries, keys and values, each (N, heads, head_dim).

    The `qkv` kernel (D, 3, heads, head_dim) as three 2-D matmuls, one per slice
    of its second axis: a sharded `heads` axis stays sharded (as MaxText's q, k, v).
    """
    x, kernel, bias = promoted(self.qkv, x)
    return tuple(matmul_rows(x, kernel[:, i], None if bias is None else bias[i], 1)
                 for i in range(3))

  def project_out(self, out: jax.Array) -> jax.Array:
    """(N, heads, head_dim) attended rows -> (N, D) through the `proj` Einsum's weights."""
    return matmul_rows(*promoted(self.proj, out), 2)

  def decode(self, x: jax.Array, mask: jax.Array, cache: dict[str, jax.Array],
             index: jax.Array | int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(B, T, D) new tokens -> (B, T, D) and the cache with their keys and values.

    Flax lm1b's `decode=True` idea with the cache as an explicit pytree: the
    T new keys and values are written at [index, index + T) of the
    (B, S, heads, head_dim) cache, and the queries attend over the S cached
    positions that `mask` (B|1, 1, T, S) allows.
    """
    q, k, v = over_rows(self.project_qkv, x)  # 3 x (B, T, heads, head_dim)
    start = (0, index, 0, 0)
    k = jax.lax.dynamic_update_slice(cache['key'], k.astype(cache['key'].dtype), start)
    v = jax.lax.dynamic_update_slice(cache['value'], v.astype(cache['value'].dtype), start)
    out, _ = attend(q.astype(k.dtype), k, v, mask, implementation=self.implementation)
    return over_rows(self.project_out, out.astype(x.dtype), 2), {'key': k, 'value': v}


class Mlp(nnx.Module):
  """Feed-forward block: Linear -> GELU ('erf' exact, or 'tanh' GPT-2's gelu_new) -> Linear."""

  def __init__(self, width: int, mlp_dim: int, *, dtype: Dtype = jnp.float32,
               use_bias: bool = True, gelu: str = 'erf', kernel_init: KernelInit = xavier_uniform,
               residual_init: KernelInit | None = None, rngs: nnx.Rngs):
    if gelu not in ('erf', 'tanh'):
      raise ConfigError(f"gelu={gelu!r}: expected 'erf' or 'tanh'")
    self.fc1 = nnx.Linear(
        width, mlp_dim, use_bias=use_bias, dtype=dtype, rngs=rngs,
        kernel_init=partitioned(kernel_init(), 'embed', 'mlp'),
        bias_init=partitioned(nnx.initializers.zeros, 'mlp'))
    self.fc2 = nnx.Linear(
        mlp_dim, width, use_bias=use_bias, dtype=dtype, rngs=rngs,
        kernel_init=partitioned((residual_init or kernel_init)(), 'mlp', 'embed'),
        bias_init=partitioned(nnx.initializers.zeros, 'embed'))
    self.approximate_gelu = gelu == 'tanh'

  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., D) -> (..., D), on the tokens as rows (`over_rows`)."""
    return over_rows(
        lambda h: self.fc2(jax.nn.gelu(self.fc1(h), approximate=self.approximate_gelu)), x)


class Block(nnx.Module):
  """Pre-LN (x + f(norm(x)); ViT, GPT-2) or post-LN (norm(x + f(x)); BERT) block.

  Each residual branch is dropped out (`dropout_rate`, with a `dropout_rng`;
  where HF GPT-2/BERT apply `resid_dropout` / `hidden_dropout`) and dropped
  per example (`drop_path_rate`, with a `drop_path_key`; DINO's Block.forward,
  vision_transformer.py lines 107-113, one DropPath draw per branch).
  """

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dtype: Dtype = jnp.float32,
               norm: str = 'pre', layer_norm_eps: float = 1e-6, gelu: str = 'erf',
               use_bias: bool = True, kernel_init: KernelInit = xavier_uniform,
               residual_init: KernelInit | None = None, dropout_rate: float = 0.0,
               drop_path_rate: float = 0.0, implementation: str = 'auto',
               rngs: nnx.Rngs):
    if norm not in ('pre', 'post'):
      raise ConfigError(f"norm={norm!r}: expected 'pre' or 'post'")
    inits = dict(kernel_init=kernel_init, residual_init=residual_init)
    norm_options = dict(eps=layer_norm_eps, use_bias=use_bias, dtype=dtype, rngs=rngs)
    self.norm1 = layer_norm(width, **norm_options)
    self.attn = Attention(width, num_heads, dtype=dtype, use_bias=use_bias, **inits,
                          dropout_rate=dropout_rate, implementation=implementation, rngs=rngs)
    self.norm2 = layer_norm(width, **norm_options)
    self.mlp = Mlp(width, mlp_dim, dtype=dtype, use_bias=use_bias, gelu=gelu, **inits, rngs=rngs)
    self.pre_norm = norm == 'pre'
    self.dropout_rate = dropout_rate
    self.drop_path_rate = float(drop_path_rate)  # Static: part of the graph, not the state.

  def __call__(self, x: jax.Array, drop_path_key: jax.Array | None = None, *,
               mask: jax.Array | None = None, causal: bool = False,
               dropout_rng: jax.Array | None = None,
               need_weights: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """(B, T, D) -> ((B, T, D), attention weights or None); no keys: deterministic."""
    attn_rng, attn_out_rng, mlp_out_rng = split_rng(dropout_rng, 3)

    def attention(h: jax.Array) -> tuple[jax.Array, jax.Array | None]:
      return self.attn(h, mask, causal=causal, dropout_rng=attn_rng, need_weights=need_weights)
    return self._residuals(x, attention, drop_path_key, attn_out_rng, mlp_out_rng)

  def decode(self, x: jax.Array, mask: jax.Array, cache: dict[str, jax.Array],
             index: jax.Array | int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(B, T, D) new tokens with a KV cache (`Attention.decode`) -> (B, T, D), the cache."""
    return self._residuals(x, lambda h: self.attn.decode(h, mask, cache, index), None, None, None)

  def _residuals(self, x: jax.Array, attention: Any, drop_path_key: jax.Array | None,
                 attn_out_rng: jax.Array | None,
                 mlp_out_rng: jax.Array | None) -> tuple[jax.Array, Any]:
    """The two residual branches around `attention` (h -> (out, extra)) and the MLP."""
    attn_key = mlp_key = None
    if drop_path_key is not None:
      attn_key, mlp_key = jax.random.split(drop_path_key)

    def branch(y: jax.Array, rng: jax.Array | None, key: jax.Array | None) -> jax.Array:
      return drop_path(dropout(y, self.dropout_rate, rng), self.drop_path_rate, key)
    if self.pre_norm:
      attended, extra = attention(self.norm1(x))
      x = x + branch(attended, attn_out_rng, attn_key)
      return x + branch(self.mlp(self.norm2(x)), mlp_out_rng, mlp_key), extra
    attended, extra = attention(x)
    x = self.norm1(x + branch(attended, attn_out_rng, attn_key))
    return self.norm2(x + branch(self.mlp(x), mlp_out_rng, mlp_key)), extra


def apply_block(block: Block, x: jax.Array, *args: Any, remat: Any = False,
                **kwargs: Any) -> tuple[jax.Array, Any]:
  """`block(x, *args, **kwargs)`, rematerialised by the policy `remat` names (`models.remat`)."""
  return checkpointed(lambda blk, h, *a: blk(h, *a, **kwargs), remat)(block, x, *args)


class Transformer(nnx.Module):
  """A stack of pre-LN blocks and a final LayerNorm: the ViT encoder and MAE's decoder.

  `drop_path_rate` rises linearly over the blocks (`drop_path_rates`) and is
  used only by calls that pass a `drop_path_key`.
  """

  def __init__(self, width: int, depth: int, num_heads: int, mlp_dim: int, *,
               dtype: Dtype = jnp.float32, remat: Any = False,
               kernel_init: KernelInit = xavier_uniform, drop_path_rate: float = 0.0,
               rngs: nnx.Rngs):
    self.blocks = nnx.List([
        Block(width, num_heads, mlp_dim, dtype=dtype, kernel_init=kernel_init,
              drop_path_rate=rate, rngs=rngs)
        for rate in drop_path_rates(drop_path_rate, depth)])
    self.norm = layer_norm(width, dtype=dtype, rngs=rngs)
    self.remat = policy_name(remat)  # Checked here: a bad name fails at build, not at trace.

  def __call__(self, x: jax.Array, drop_path_key: jax.Array | None = None,
               final_norm: bool = True) -> tuple[jax.Array, jax.Array]:
    """(B, T, D) -> (normed output (B, T, D), last block's attention weights).

    `drop_path_key` (train mode) gives block i the key fold_in(key, i); None
    (eval, features, the teacher) runs every block whole. Only the last
    block returns its weights; the others skip them (and may take a fused kernel).
    `final_norm=False` skips the last LayerNorm (MAE fine-tuning's global pool).
    """
    weights = None
    for i, block in enumerate(self.blocks):
      key = None if drop_path_key is None else jax.random.fold_in(drop_path_key, i)
      x, weights = apply_block(block, x, key, remat=self.remat,
                               need_weights=i == len(self.blocks) - 1)
    return (self.norm(x) if final_norm else x), weights


def count_params(model_or_state: Any) -> int:
  """Number of scalars in the `nnx.Param`s of a model or state (abstract ones too)."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(
      model_or_state, nnx.Param)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))
