"""Autoregressive sampling from a causal `TransformerLM` with its KV cache, under jit.

The prompt is run once through `TransformerLM.decode` to fill the cache
(prefill), then a `lax.scan` feeds one token per step. The per-step choice
follows nanoGPT's `generate`: divide the logits by the temperature, keep the
`top_k` largest, sample from the softmax; temperature 0 takes the argmax.
Step i draws with `fold_in(key, i)`, so a fixed key reproduces a sample.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ssl_jax.models.lm import TransformerLM


def choose_next(logits: jax.Array, key: jax.Array, temperature: jax.Array | float,
                top_k: int | None = None) -> jax.Array:
  """(B, V) next-token logits -> (B,) int32 ids: sampled, or argmax if temperature is 0."""
  logits = logits.astype(jnp.float32)
  if top_k is not None:
    kth_largest = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]  # (B, 1)
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  greedy = jnp.argmax(logits, axis=-1)
  # The maximum only keeps the unused branch finite when temperature is 0.
  sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
  return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'top_k'))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt: jax.Array, key: jax.Array,
              temperature: jax.Array, *, max_new_tokens: int,
              top_k: int | None) -> jax.Array:
  """Jitted body of `generate` on the split model."""
  model = nnx.merge(graphdef, state)
  batch, prompt_len = prompt.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  out, cache = model.decode(prompt, cache, 0)
  first = choose_next(out['logits'][:, -1], jax.random.fold_in(key, 0), temperature, top_k)

  def step(carry, i):
    token, cache = carry  # (B,), the token chosen at step i
    out, cache = model.decode(token[:, None], cache, prompt_len + i)
    following = choose_next(out['logits'][:, -1], jax.random.fold_in(key, i + 1),
                            temperature, top_k)
    return (following, cache), token

  (last, _), tokens = jax.lax.scan(step, (first, cache), jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([tokens.T, last[:, None]], axis=1)  # (B, max_new_tokens)


def generate(model: TransformerLM, prompt_tokens: jax.Array, key: jax.Array, *,
             max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None) -> jax.Array:
  """Continues each (B, P) prompt by `max_new_tokens` tokens; returns them (B, max_new_tokens).

  Args:
    model: a causal `TransformerLM`.
    prompt_tokens: (B, P) int ids, P >= 1; all rows have the same length.
    key: PRNG key; the same key gives the same continuation.
    max_new_tokens: how many tokens to generate; P + max_new_tokens must not
      exceed the model's max_len (there is no sliding window).
    temperature: softmax temperature; 0 is greedy decoding.
    top_k: sample only among the k most likely tokens (None: all).
  """
  prompt = jnp.asarray(prompt_tokens, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f'prompt_tokens must be (B, P) with P >= 1, got shape {prompt.shape}')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  if prompt.shape[1] + max_new_tokens > model.config.max_len:
    raise ValueError(
        f'prompt of {prompt.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the '
        f'model\'s context of {model.config.max_len}; shorten the prompt or generate fewer.')
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  if top_k is not None and top_k < 1:
    raise ValueError(f'top_k must be None or >= 1, got {top_k}')
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt, key, jnp.float32(temperature),
                   max_new_tokens=max_new_tokens, top_k=top_k)
