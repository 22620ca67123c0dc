"""The GPT-2 / BERT transformer: reference forward, masks, KV cache, sampling, shapes, sharding."""

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssl_jax import losses, sharding
from ssl_jax.models import lm, sampling, transformer

VOCAB, LENGTH = 64, 16


# nanoGPT's model (model.py L116 bias, train.py L56 bias = False; model.py L83 nn.GELU()).
NANOGPT = dict(use_bias=False, gelu='erf')


def tiny_config(kind: str, **overrides) -> lm.TransformerConfig:
  """A small model; kind 'gpt', 'bert', or 'nanogpt' (GPT-2 without biases, erf GELU)."""
  sizes = dict(vocab_size=VOCAB, max_len=LENGTH, width=32, depth=2, num_heads=4, mlp_dim=64)
  if kind == 'nanogpt':
    sizes.update(NANOGPT)
  sizes.update(overrides)
  return (lm.bert_config if kind == 'bert' else lm.gpt2_config)(**sizes)


@contextlib.contextmanager
def mesh_of(data=1, fsdp=1, tensor=1):
  """Activates a (data, fsdp, tensor) mesh over the first data*fsdp*tensor devices."""
  devices = jax.devices()[:data * fsdp * tensor]
  mesh = sharding.make_mesh(sharding.mesh_config(data, fsdp, tensor), devices)
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    yield mesh


@functools.cache
def tiny_model(kind: str, **overrides) -> lm.TransformerLM:
  with mesh_of():
    return lm.TransformerLM(tiny_config(kind, **overrides), rngs=nnx.Rngs(0))


def random_tokens(seed: int, batch: int = 2, length: int = 10) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype(np.int32)


@nnx.jit
def forward(model, tokens, token_types=None, key_mask=None, dropout_rng=None):
  """The model's forward pass, jitted: eager op-by-op dispatch is slow on CPU."""
  return model(tokens, token_types=token_types, key_mask=key_mask, dropout_rng=dropout_rng)


def logits_of(model, tokens, **kwargs) -> np.ndarray:
  return np.asarray(forward(model, tokens, **kwargs)['logits'])


# ---------------------------------------------------------------- NumPy reference forward.

def np_layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p.get('bias', 0.0)


def np_gelu(x, kind):
  if kind == 'erf':
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def np_attention(h, p, num_heads, causal):
  """HF-style attention: split q|k|v of the fused (D, 3D) weight, -inf above the diagonal."""
  batch, length, width = h.shape
  w = p['qkv']['kernel'].reshape(width, 3 * width)
  qkv = h @ w + p['qkv'].get('bias', np.zeros(3 * width)).reshape(3 * width)
  q, k, v = (a.reshape(batch, length, num_heads, -1).transpose(0, 2, 1, 3)
             for a in np.split(qkv, 3, axis=-1))
  scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
  if causal:
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
  return out @ p['proj']['kernel'].reshape(width, width) + p['proj'].get('bias', 0.0)


def np_mlp(h, p, gelu):
  """fc1 -> GELU ('erf' or 'tanh') -> fc2; a missing bias is no bias."""
  hidden = np_gelu(h @ p['fc1']['kernel'] + p['fc1'].get('bias', 0.0), gelu)
  return hidden @ p['fc2']['kernel'] + p['fc2'].get('bias', 0.0)


def np_forward(params, tokens, types, config):
  """float64 GPT-2 (pre-LN) / BERT (post-LN) forward from the parameter dict."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  eps, gelu = config.layer_norm_eps, config.gelu
  x = p['token_embed']['embedding'][tokens] + p['position_embed']['embedding'][
      np.arange(tokens.shape[1])]
  if config.type_vocab_size:
    x = x + p['type_embed']['embedding'][types]
  if config.embed_norm:
    x = np_layer_norm(x, p['embed_norm'], eps)
  for i in range(config.depth):
    b = p['blocks'][i]
    mlp = lambda h, b=b: np_mlp(h, b['mlp'], gelu)
    if config.norm == 'pre':
      x = x + np_attention(np_layer_norm(x, b['norm1'], eps), b['attn'], config.num_heads, True)
      x = x + mlp(np_layer_norm(x, b['norm2'], eps))
    else:
      x = np_layer_norm(x + np_attention(x, b['attn'], config.num_heads, config.causal),
                        b['norm1'], eps)
      x = np_layer_norm(x + mlp(x), b['norm2'], eps)
  if config.norm == 'pre':
    x = np_layer_norm(x, p['final_norm'], eps)
  embedding = p['token_embed']['embedding']
  if config.head == 'mlm':
    h = np_gelu(x @ p['mlm_dense']['kernel'] + p['mlm_dense']['bias'], gelu)
    return x, np_layer_norm(h, p['mlm_norm'], eps) @ embedding.T + p['mlm_bias']
  return x, x @ embedding.T


def randomised(model):
  """A copy of `model` whose biases and LayerNorms are random too, so they are tested."""
  graphdef, params = nnx.split(model)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(7)
  leaves = [np.asarray(a) + rng.normal(0, 0.1, a.shape).astype(np.float32) for a in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize('kind', ['gpt', 'bert', 'nanogpt'])
def test_forward_matches_numpy_reference(kind):
  model = randomised(tiny_model(kind))
  tokens = random_tokens(0)
  types = (np.arange(10) >= 6).astype(np.int32)[None].repeat(2, 0)
  out = forward(model, tokens, token_types=types if kind == 'bert' else None)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  hidden, logits = np_forward(params, tokens, types, model.config)
  assert out['logits'].shape == (2, 10, VOCAB) and out['hidden'].shape == (2, 10, 32)
  np.testing.assert_allclose(out['hidden'], hidden, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(out['logits'], logits, atol=2e-5, rtol=1e-4)
  if kind == 'bert':  # Segment ids matter.
    other = logits_of(model, tokens)
    assert np.abs(other - np.asarray(out['logits'])).max() > 1e-2


# ---------------------------------------------------------------- Masks.

def test_gpt_logits_at_t_ignore_later_tokens():
  model = tiny_model('gpt')
  tokens = random_tokens(1)
  changed = tokens.copy()
  changed[:, 6:] = (changed[:, 6:] + 1 + np.arange(4)) % VOCAB
  before, after = logits_of(model, tokens), logits_of(model, changed)
  np.testing.assert_allclose(after[:, :6], before[:, :6], atol=1e-6)
  assert np.abs(after[:, 6:] - before[:, 6:]).max(axis=-1).min() > 1e-4  # Later ones did change.


def test_bert_is_bidirectional_and_padding_keys_are_ignored():
  model = tiny_model('bert')
  tokens = random_tokens(2)
  changed = tokens.copy()
  changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
  before, after = logits_of(model, tokens), logits_of(model, changed)
  assert np.abs(after[:, :6] - before[:, :6]).max(axis=-1).min() > 1e-4  # Every position saw it.
  # With positions 6.. marked as padding keys, they no longer influence positions < 6.
  key_mask = np.arange(10)[None].repeat(2, 0) < 6
  before = logits_of(model, tokens, key_mask=key_mask)
  after = logits_of(model, changed, key_mask=key_mask)
  np.testing.assert_allclose(after[:, :6], before[:, :6], atol=1e-6)
  # And equal the logits of the unpadded 6-token sequence.
  np.testing.assert_allclose(before[:, :6], logits_of(model, tokens[:, :6]), atol=1e-5)


# ---------------------------------------------------------------- KV cache and sampling.

def test_kv_cache_decode_equals_full_forward():
  model = tiny_model('gpt')
  tokens = random_tokens(3, length=12)
  full = logits_of(model, tokens)
  decode = jax.jit(lambda toks, cache, index: model.decode(toks, cache, index))
  cache = model.init_cache(2, LENGTH)  # Longer than needed: the empty tail must be masked.
  out, cache = decode(tokens[:, :5], cache, 0)  # A 5-token prefill, then one at a time.
  np.testing.assert_allclose(out['logits'], full[:, :5], atol=1e-5)
  for t in range(5, 12):
    out, cache = decode(tokens[:, t:t + 1], cache, jnp.int32(t))
    np.testing.assert_allclose(out['logits'][:, 0], full[:, t], atol=1e-5, err_msg=f't={t}')
  with pytest.raises(ValueError, match='bidirectional'):
    tiny_model('bert').decode(tokens[:, :1], cache, 0)


def test_generation_greedy_sampled_and_top_k():
  model = tiny_model('gpt')
  prompt = random_tokens(4, batch=3, length=4)
  key = jax.random.key(0)
  generate = functools.partial(sampling.generate, model, prompt, max_new_tokens=10)
  greedy = np.asarray(generate(key, temperature=0.0))
  assert greedy.shape == (3, 10) and greedy.dtype == np.int32
  # Greedy: every new token is the argmax of the full forward pass over what precedes it.
  logits = logits_of(model, np.concatenate([prompt, greedy], axis=1))  # (3, 14, V)
  np.testing.assert_array_equal(greedy, np.argmax(logits[:, 3:-1], axis=-1))
  # A different key changes nothing at temperature 0; top_k=1 is greedy at any temperature.
  np.testing.assert_array_equal(generate(jax.random.key(5), temperature=0.0), greedy)
  np.testing.assert_array_equal(generate(jax.random.key(5), temperature=1.0, top_k=1), greedy)
  sampled = np.asarray(generate(key, temperature=1.0))
  np.testing.assert_array_equal(generate(key, temperature=1.0), sampled)  # Reproducible.
  other = np.asarray(generate(jax.random.key(1), temperature=1.0))
  assert (other != sampled).mean() > 0.5  # A random tiny model is near-uniform over 64 ids.
  assert (sampled != greedy).mean() > 0.5
  with pytest.raises(ValueError, match='exceeds the model'):
    generate(key, max_new_tokens=LENGTH)


def test_top_k_restricts_the_support():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
  allowed = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  for seed in range(20):
    chosen = np.asarray(sampling.choose_next(logits, jax.random.key(seed), 2.0, top_k=3))
    assert all(chosen[b] in allowed[b] for b in range(4))


# ---------------------------------------------------------------- Shapes and init.

def abstract_params(config):
  with mesh_of():
    return nnx.eval_shape(lambda: lm.TransformerLM(config, rngs=nnx.Rngs(0)))


def test_gpt2_124m_parameter_count():
  # nanoGPT / HF GPT2LMHeadModel('gpt2') with the head tied to wte: 124,439,808.
  model = abstract_params(lm.gpt2_config())
  assert transformer.count_params(model) == 124_439_808
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)  # Nothing allocated.


def test_bert_base_parameter_count():
  vocab, positions, types, width, mlp, depth = 30522, 512, 2, 768, 3072, 12
  embeddings = (vocab + positions + types) * width + 2 * width  # + embedding LayerNorm
  layer = 4 * (width * width + width) + 2 * width * mlp + mlp + width + 2 * 2 * width
  mlm_head = width * width + width + 2 * width + vocab  # dense, LayerNorm, output bias
  pooler = width * width + width
  encoder = embeddings + depth * layer
  # HF BertModel('bert-base-uncased') reports 109,482,240 = encoder + pooler; our MLM model
  # has no pooler (no next-sentence task) but the MLM head: 108,891,648 + 622,650.
  assert encoder + pooler == 109_482_240
  assert (encoder, mlm_head) == (108_891_648, 622_650)
  assert transformer.count_params(abstract_params(lm.bert_config())) == 109_514_298


@pytest.mark.parametrize('kind', ['gpt', 'bert'])
def test_init_scales(kind):
  model = tiny_model(kind)  # depth 2: GPT-2's residual std is 0.02 / sqrt(2 * 2) = 0.01.
  residual = 0.01 if kind == 'gpt' else 0.02
  block = model.blocks[1]
  # >= 2048 draws each except the 512 position embeddings: std errors of 1.6% and 3%.
  for weight, std, rtol in [
      (block.mlp.fc1.kernel, 0.02, 0.06), (block.attn.qkv.kernel, 0.02, 0.06),
      (block.mlp.fc2.kernel, residual, 0.06), (block.attn.proj.kernel, residual, 0.1),
      (model.token_embed.embedding, 0.02, 0.06), (model.position_embed.embedding, 0.02, 0.1)]:
    np.testing.assert_allclose(np.std(np.asarray(weight[...])), std, rtol=rtol)
  np.testing.assert_array_equal(block.mlp.fc1.bias[...], 0)
  np.testing.assert_array_equal(block.norm1.scale[...], 1)


def test_bfloat16_compute_keeps_float32_parameters():
  model = tiny_model('gpt', dtype='bfloat16')
  param_dtypes = {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert param_dtypes == {np.dtype('float32')}
  tokens = random_tokens(8)
  out = forward(model, tokens)
  assert out['hidden'].dtype == jnp.bfloat16 and out['logits'].dtype == jnp.bfloat16
  want = logits_of(tiny_model('gpt'), tokens)  # Same seed, same float32 parameters.
  np.testing.assert_allclose(np.asarray(out['logits'], np.float32), want, atol=0.05)


def test_embedding_lookup_gathers_float32_rows_and_casts_them():
  """Same rows as nnx.Embed (which casts the whole table), but the table's gradient, a
  scatter-add of repeated ids, is summed in float32 rather than bfloat16."""
  embed = nnx.Embed(VOCAB, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  ids = jnp.asarray(np.r_[np.full(300, 3), np.arange(VOCAB)], jnp.int32)
  np.testing.assert_array_equal(lm.lookup(embed, ids), embed(ids))
  # Cotangents exact in bfloat16: only the scatter's accumulation can round.
  weights = jax.random.normal(jax.random.key(1), (ids.shape[0], 8)).astype(jnp.bfloat16)
  weights = weights.astype(jnp.float32)

  def table_grad(gather) -> np.ndarray:
    loss = lambda module: jnp.sum(gather(module).astype(jnp.float32) * weights)
    return np.asarray(nnx.grad(loss)(embed)['embedding'][...], np.float64)

  grad = table_grad(lambda module: lm.lookup(module, ids))
  cast_first = table_grad(lambda module: module(ids))
  want = np.zeros((VOCAB, 8))  # The exact sum, in float64.
  np.add.at(want, np.asarray(ids), np.asarray(weights, np.float64))
  assert np.abs(grad - want)[3].max() < 1e-4 < np.abs(cast_first - want)[3].max()


# ---------------------------------------------------------------- Training-time paths.

def test_dropout_only_with_an_rng():
  model = tiny_model('gpt', dropout_rate=0.1)
  tokens = random_tokens(5)
  plain = logits_of(model, tokens)
  np.testing.assert_allclose(plain, logits_of(tiny_model('gpt'), tokens), atol=1e-6)
  dropped = logits_of(model, tokens, dropout_rng=jax.random.key(0))
  assert np.abs(dropped - plain).max() > 1e-3
  np.testing.assert_array_equal(logits_of(model, tokens, dropout_rng=jax.random.key(0)), dropped)
  assert np.abs(logits_of(model, tokens, dropout_rng=jax.random.key(1)) - dropped).max() > 1e-3


# ---------------------------------------------------------------- 8 devices vs 1.

def sharded_loss_and_grads(kind, mesh_shape, dropout_rate, remat=False):
  """Loss and gradients of one forward+backward, on the mesh, gathered to the host."""
  rng = np.random.default_rng(0)
  batch = {'tokens': rng.integers(0, VOCAB, (8, LENGTH)).astype(np.int32),
           'types': (np.arange(LENGTH) >= 8).astype(np.int32)[None].repeat(8, 0),
           'weights': (rng.uniform(size=(8, LENGTH)) < 0.3).astype(np.float32)}
  # One block keeps the compile short; 8 heads so that tensor=4 splits them.
  config = tiny_config(kind, depth=1, num_heads=8, dropout_rate=dropout_rate, remat=remat)
  with mesh_of(**mesh_shape) as mesh:
    model = nnx.jit(lambda: lm.TransformerLM(config, rngs=nnx.Rngs(0)))()
    graphdef, params = nnx.split(model)
    batch = sharding.put_batch(batch, mesh)

    @jax.jit
    def loss_and_grads(params, batch):
      def loss_fn(params):
        model = nnx.merge(graphdef, params)
        out = model(batch['tokens'], token_types=batch['types'] if kind == 'bert' else None,
                    dropout_rng=jax.random.key(3) if dropout_rate else None)
        if kind != 'bert':
          return losses.next_token_loss(out['logits'], batch['tokens'])
        return losses.masked_lm_loss(out['logits'], batch['tokens'], batch['weights'])
      return jax.value_and_grad(loss_fn)(params)

    loss, grads = loss_and_grads(params, batch)
    shard_shapes = {name: leaf[...].sharding.shard_shape(leaf[...].shape) for name, leaf in [
        ('fc1', params['blocks'][0]['mlp']['fc1']['kernel']),
        ('qkv', params['blocks'][0]['attn']['qkv']['kernel']),
        ('embed', params['token_embed']['embedding'])]}
    return float(loss), jax.device_get(nnx.to_pure_dict(grads)), shard_shapes


@pytest.mark.parametrize('kind,mesh_shape,dropout_rate,remat', [
    ('gpt', dict(data=2, fsdp=2, tensor=2), 0.1, True),
    ('bert', dict(data=1, fsdp=2, tensor=4), 0.0, False),
    ('nanogpt', dict(data=2, fsdp=1, tensor=4), 0.1, False),
], ids=['gpt-dropout-remat-data2-fsdp2-tensor2', 'bert-fsdp2-tensor4',
        'nanogpt-nobias-dropout-data2-tensor4'])
def test_eight_devices_match_one(kind, mesh_shape, dropout_rate, remat):
  # GPT runs with rematerialisation on 8 devices only: the same numbers also show that
  # remat (with dropout inside the recomputed block) changes nothing.
  loss_1, grads_1, _ = sharded_loss_and_grads(kind, dict(data=1, fsdp=1, tensor=1), dropout_rate)
  loss_8, grads_8, shards = sharded_loss_and_grads(kind, mesh_shape, dropout_rate, remat)
  np.testing.assert_allclose(loss_8, loss_1, rtol=1e-6)
  flat_1 = jax.tree_util.tree_flatten_with_path(grads_1)[0]
  for (path, g1), g8 in zip(flat_1, jax.tree.leaves(grads_8), strict=True):
    np.testing.assert_allclose(g8, g1, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert max(np.abs(g).max() for g in jax.tree.leaves(grads_1)) > 1e-2  # Real gradients.
  # MLP hidden units, attention heads and the vocabulary really are split over `tensor`.
  fsdp, tensor = mesh_shape['fsdp'], mesh_shape['tensor']
  assert shards == {'fc1': (32 // fsdp, 64 // tensor), 'qkv': (32 // fsdp, 3, 8 // tensor, 4),
                    'embed': (VOCAB // tensor, 32 // fsdp)}
