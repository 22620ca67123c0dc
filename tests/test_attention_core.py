"""The transformer core's attention: the fused path (jax.nn.dot_product_attention) equals the
explicit softmax path that returns the weights, under causal and padding masks and with a KV cache.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssl_jax.errors import ConfigError
from ssl_jax.models import regularizers, transformer

B, T, HEADS, HEAD_DIM, WIDTH = 2, 6, 2, 8, 16


@pytest.fixture(autouse=True)
def no_eager_sharding():
  """Modules built outside a mesh (as test_dino_depth.py does)."""
  with nnx.use_eager_sharding(False):
    yield


def qkv(seed: int = 0, length: int = T):
  """Random (B, length, heads, head_dim) queries, keys and values."""
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (B, length, HEADS, HEAD_DIM)) for k in keys]


def padding_mask() -> jax.Array:
  """(B, 1, 1, T): example 0 has 2 padding keys at the end, example 1 is all padding."""
  keep = np.ones((B, T), bool)
  keep[0, -2:] = False
  keep[1, :] = False
  return jnp.asarray(keep)[:, None, None, :]


MASKS = {'none': dict(mask=None, causal=False), 'causal': dict(mask=None, causal=True),
         'padding': dict(mask='padding', causal=False),
         'causal_padding': dict(mask='padding', causal=True)}


@pytest.mark.parametrize('case', MASKS)
def test_fused_path_equals_explicit_path(case):
  q, k, v = qkv()
  mask = padding_mask() if MASKS[case]['mask'] else None
  causal = MASKS[case]['causal']
  plain, no_weights = transformer.attend(q, k, v, mask, causal=causal)
  explicit, weights = transformer.attend(q, k, v, mask, causal=causal, need_weights=True)
  fused = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                       implementation='xla')  # jax's own kernel.
  assert no_weights is None and weights.shape == (B, HEADS, T, T)
  assert np.isfinite(np.asarray(fused)).all() and np.isfinite(np.asarray(explicit)).all()
  np.testing.assert_allclose(np.asarray(fused), np.asarray(explicit), atol=2e-6)
  np.testing.assert_allclose(np.asarray(plain), np.asarray(explicit), atol=2e-6)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-6)
  # NumPy: softmax over the allowed keys (a row with none: uniform over all).
  allowed = np.ones((B, 1, T, T), bool)
  if mask is not None:
    allowed &= np.asarray(mask)
  if causal:
    allowed &= np.tril(np.ones((T, T), bool))
  logits = np.einsum('bqhe,bkhe->bhqk', np.asarray(q, np.float64), np.asarray(k)) / HEAD_DIM**0.5
  logits = np.where(allowed, logits, -1e30)
  want = np.exp(logits - logits.max(-1, keepdims=True))
  want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(weights), want, atol=1e-6)
  if mask is not None:  # Example 1 is all padding: a finite, uniform average, no NaN.
    np.testing.assert_allclose(np.asarray(fused[1]), np.broadcast_to(
        np.asarray(v[1]).mean(0), (T, HEADS, HEAD_DIM)), atol=1e-5)


def attention_module(dropout_rate: float = 0.0) -> transformer.Attention:
  return transformer.Attention(WIDTH, HEADS, dropout_rate=dropout_rate, rngs=nnx.Rngs(0))


def test_kv_cache_decode_equals_the_full_causal_pass():
  """Chunks of 3, 1 and 2 tokens into a longer cache give the explicit causal pass's outputs."""
  attn = attention_module()
  x = jax.random.normal(jax.random.key(1), (B, T, WIDTH))
  full, _ = attn(x, causal=True, need_weights=True)  # The explicit path.
  cache = {'key': jnp.zeros((B, 10, HEADS, HEAD_DIM)), 'value': jnp.zeros((B, 10, HEADS, HEAD_DIM))}
  outs, index = [], 0
  for size in (3, 1, 2):
    positions = index + jnp.arange(size)
    mask = (jnp.arange(10)[None, :] <= positions[:, None])[None, None]  # (1, 1, size, 10)
    out, cache = attn.decode(x[:, index:index + size], mask, cache, index)
    outs.append(out)
    index += size
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), atol=2e-6)
  np.testing.assert_array_equal(np.asarray(cache['key'][:, T:]), 0.0)  # Untouched beyond T.


def test_attention_dropout_takes_the_explicit_path():
  """With a dropout rng the weights are dropped (the fused kernel has no dropout)."""
  attn = attention_module(dropout_rate=0.5)
  x = jax.random.normal(jax.random.key(2), (B, T, WIDTH))
  rng = jax.random.key(3)
  dropped, _ = attn(x, causal=True, dropout_rng=rng, need_weights=False)
  plain, weights = attn(x, causal=True)
  qkv_out = attn.qkv(x)  # The Einsum as built: (B, T, 3, heads, head_dim).
  kept = regularizers.dropout(weights, 0.5, rng)
  want = attn.proj(jnp.einsum('bhqk,bkhe->bqhe', kept, qkv_out[:, :, 2]))
  np.testing.assert_allclose(np.asarray(dropped), np.asarray(want), atol=1e-6)
  assert np.abs(np.asarray(dropped) - np.asarray(plain)).max() > 1e-2
  fused, none = attn(x, causal=True, need_weights=False)  # No rng: deterministic, fused.
  assert none is None
  np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), atol=2e-6)


def test_vit_stack_returns_only_the_last_blocks_weights():
  stack = transformer.Transformer(WIDTH, 3, HEADS, 32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), (B, T, WIDTH))
  out, weights = stack(x)
  h = x
  for block in stack.blocks:
    h, last = block(h)  # need_weights defaults to True, as torch's MultiheadAttention.
  np.testing.assert_allclose(np.asarray(out), np.asarray(stack.norm(h)), atol=2e-6)
  np.testing.assert_allclose(np.asarray(weights), np.asarray(last), atol=1e-6)


def test_auto_picks_cudnn_only_where_it_applies(monkeypatch):
  q = jnp.zeros((2, 8, 4, 16), jnp.bfloat16)
  mask = jnp.ones((2, 1, 8, 8), bool)
  assert transformer.fused_implementation(q, None, 'auto') == 'xla'  # This CPU.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert transformer.fused_implementation(q, None, 'auto') == 'cudnn'
  assert transformer.fused_implementation(q, mask, 'auto') == 'xla'  # BERT's padding.
  assert transformer.fused_implementation(q.astype(jnp.float32), None, 'auto') == 'xla'
  assert transformer.fused_implementation(q, None, 'xla') == 'xla'
  with pytest.raises(ConfigError, match="'flash' is not one of"):
    transformer.fused_implementation(q, None, 'flash')


def test_auto_falls_back_to_xla_when_cudnn_refuses(monkeypatch):
  """On this CPU cuDNN refuses at trace time: 'auto' gives XLA's result, 'cudnn' fails."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 8, 4, 16)), jnp.bfloat16) for _ in range(3))
  expected, _ = transformer.attend(q, k, v, causal=True, implementation='xla')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  out, _ = transformer.attend(q, k, v, causal=True, implementation='auto')
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
  with pytest.raises(Exception):  # noqa: B017  (cuDNN's own error, whichever it is)
    transformer.attend(q, k, v, causal=True, implementation='cudnn')


@pytest.mark.parametrize('length, causal', [(7, False), (7, True), (6, True)])
def test_fused_attention_pads_odd_lengths_to_the_same_result(monkeypatch, length, causal):
  """jax refuses cuDNN's training kernel for odd lengths: such a sequence gets one masked pad
  token, and its outputs and gradients are those of the unpadded softmax attention."""
  q, k, v = qkv(5, length)
  seen = []
  fused = jax.nn.dot_product_attention
  monkeypatch.setattr(jax, 'device_count', lambda: 1)  # The tests run on 8 CPU devices.

  def recording(*args, **kwargs):
    seen.append((args[0].shape[1], kwargs.get('key_value_seq_lengths')))
    return fused(*args, **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', recording)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

  def padded(q, k, v):
    return transformer.fused_attention(q, k, v, causal=causal, implementation='xla')

  def explicit(q, k, v):
    return transformer.attend(q, k, v, causal=causal, need_weights=True)[0]

  np.testing.assert_allclose(padded(q, k, v), explicit(q, k, v), atol=2e-6)
  for got, want in zip(jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v),
                       jax.grad(loss(explicit), argnums=(0, 1, 2))(q, k, v), strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5)
  padded_length, kv_lengths = seen[0]
  assert padded_length == length + length % 2
  if length % 2:
    np.testing.assert_array_equal(kv_lengths, [length] * B)
  else:
    assert kv_lengths is None
  # On several devices the call is left as it is (the padded one is unchecked there).
  monkeypatch.setattr(jax, 'device_count', lambda: 2)
  np.testing.assert_allclose(padded(q, k, v), explicit(q, k, v), atol=2e-6)
  assert seen[-1] == (length, None)


def test_fused_attention_applies_a_mask_it_is_given():
  """An explicit 'cudnn' choice can come with BERT's padding mask: it reaches the kernel."""
  q, k, v = qkv(6)
  got = transformer.fused_attention(q, k, v, padding_mask(), causal=False, implementation='xla')
  want, _ = transformer.attend(q, k, v, padding_mask(), need_weights=True)
  np.testing.assert_allclose(got, want, atol=2e-6)
