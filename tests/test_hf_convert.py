"""GPT-2 / BERT parameters to and from Hugging Face state-dict names, shapes and layouts."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ssl_jax import sharding
from ssl_jax.models import hf_convert, lm

VOCAB, LENGTH, WIDTH, HEADS, MLP = 40, 12, 16, 2, 24


def tiny_model(kind: str, seed: int = 0, **overrides) -> lm.TransformerLM:
  make = lm.gpt2_config if kind == 'gpt' else lm.bert_config
  config = make(vocab_size=VOCAB, max_len=LENGTH, width=WIDTH, depth=2, num_heads=HEADS,
                mlp_dim=MLP, **overrides)
  mesh = sharding.make_mesh(sharding.mesh_config(1, 1, 1), jax.devices()[:1])
  with sharding.activate(mesh, sharding.DEFAULT_RULES):
    model = lm.TransformerLM(config, rngs=nnx.Rngs(seed))
  # Random biases and LayerNorms too, so a swapped or untransposed array shows.
  graphdef, params = nnx.split(model)
  rng = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(
      lambda a: jnp.asarray(a + rng.normal(0, 0.1, a.shape).astype(np.float32)), params))


def params_of(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


# The names and shapes of GPT2LMHeadModel / BertForMaskedLM state dicts (modeling_gpt2.py,
# modeling_bert.py) for a 2-layer model, written out from HF's module tree.
def hf_gpt2_names():
  names = {'transformer.wte.weight': (VOCAB, WIDTH), 'transformer.wpe.weight': (LENGTH, WIDTH),
           'transformer.ln_f.weight': (WIDTH,), 'transformer.ln_f.bias': (WIDTH,),
           'lm_head.weight': (VOCAB, WIDTH)}
  for i in range(2):
    h = f'transformer.h.{i}.'
    names.update({
        h + 'ln_1.weight': (WIDTH,), h + 'ln_1.bias': (WIDTH,),
        h + 'attn.c_attn.weight': (WIDTH, 3 * WIDTH), h + 'attn.c_attn.bias': (3 * WIDTH,),
        h + 'attn.c_proj.weight': (WIDTH, WIDTH), h + 'attn.c_proj.bias': (WIDTH,),
        h + 'ln_2.weight': (WIDTH,), h + 'ln_2.bias': (WIDTH,),
        h + 'mlp.c_fc.weight': (WIDTH, MLP), h + 'mlp.c_fc.bias': (MLP,),
        h + 'mlp.c_proj.weight': (MLP, WIDTH), h + 'mlp.c_proj.bias': (WIDTH,)})
  return names


def hf_bert_names():
  e, c = 'bert.embeddings.', 'cls.predictions.'
  names = {e + 'word_embeddings.weight': (VOCAB, WIDTH),
           e + 'position_embeddings.weight': (LENGTH, WIDTH),
           e + 'token_type_embeddings.weight': (2, WIDTH),
           e + 'LayerNorm.weight': (WIDTH,), e + 'LayerNorm.bias': (WIDTH,),
           c + 'bias': (VOCAB,), c + 'transform.dense.weight': (WIDTH, WIDTH),
           c + 'transform.dense.bias': (WIDTH,), c + 'transform.LayerNorm.weight': (WIDTH,),
           c + 'transform.LayerNorm.bias': (WIDTH,), c + 'decoder.weight': (VOCAB, WIDTH),
           c + 'decoder.bias': (VOCAB,)}
  for i in range(2):
    layer = f'bert.encoder.layer.{i}.'
    for name in ('query', 'key', 'value'):
      names[layer + f'attention.self.{name}.weight'] = (WIDTH, WIDTH)
      names[layer + f'attention.self.{name}.bias'] = (WIDTH,)
    names.update({
        layer + 'attention.output.dense.weight': (WIDTH, WIDTH),
        layer + 'attention.output.dense.bias': (WIDTH,),
        layer + 'attention.output.LayerNorm.weight': (WIDTH,),
        layer + 'attention.output.LayerNorm.bias': (WIDTH,),
        layer + 'intermediate.dense.weight': (MLP, WIDTH),
        layer + 'intermediate.dense.bias': (MLP,),
        layer + 'output.dense.weight': (WIDTH, MLP), layer + 'output.dense.bias': (WIDTH,),
        layer + 'output.LayerNorm.weight': (WIDTH,), layer + 'output.LayerNorm.bias': (WIDTH,)})
  return names


# ------------------------------------------ Forward passes written on HF's names and layouts.

def ln(x, sd, name, eps):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * sd[name + '.weight'] + sd[name + '.bias']


def attention(q, k, v, causal):
  """(T, D) each -> (T, D); heads are consecutive head_dim slices, as HF's view(..., H, Dh)."""
  length = q.shape[0]
  split = lambda a: a.reshape(length, HEADS, -1).transpose(1, 0, 2)  # (H, T, Dh)
  q, k, v = split(q), split(k), split(v)
  scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
  if causal:
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return (probs @ v).transpose(1, 0, 2).reshape(length, -1)


def gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def hf_gpt2_logits(sd, tokens):
  """GPT2LMHeadModel.forward for one sequence; Conv1D computes x @ weight + bias."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  conv1d = lambda x, name: x @ sd[name + '.weight'] + sd[name + '.bias']
  x = sd['transformer.wte.weight'][tokens] + sd['transformer.wpe.weight'][:len(tokens)]
  for i in range(2):
    h = f'transformer.h.{i}.'
    q, k, v = np.split(conv1d(ln(x, sd, h + 'ln_1', 1e-5), h + 'attn.c_attn'), 3, axis=-1)
    x = x + conv1d(attention(q, k, v, causal=True), h + 'attn.c_proj')
    x = x + conv1d(gelu_tanh(conv1d(ln(x, sd, h + 'ln_2', 1e-5), h + 'mlp.c_fc')),
                   h + 'mlp.c_proj')
  return ln(x, sd, 'transformer.ln_f', 1e-5) @ sd['lm_head.weight'].T


def hf_bert_logits(sd, tokens, types):
  """BertForMaskedLM.forward for one sequence; nn.Linear computes x @ weight.T + bias."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  linear = lambda x, name: x @ sd[name + '.weight'].T + sd[name + '.bias']
  e = 'bert.embeddings.'
  x = (sd[e + 'word_embeddings.weight'][tokens] + sd[e + 'token_type_embeddings.weight'][types]
       + sd[e + 'position_embeddings.weight'][:len(tokens)])
  x = ln(x, sd, e + 'LayerNorm', 1e-12)
  for i in range(2):
    layer = f'bert.encoder.layer.{i}.'
    q, k, v = (linear(x, layer + f'attention.self.{n}') for n in ('query', 'key', 'value'))
    x = ln(x + linear(attention(q, k, v, causal=False), layer + 'attention.output.dense'),
           sd, layer + 'attention.output.LayerNorm', 1e-12)
    x = ln(x + linear(gelu_erf(linear(x, layer + 'intermediate.dense')), layer + 'output.dense'),
           sd, layer + 'output.LayerNorm', 1e-12)
  c = 'cls.predictions.'
  x = ln(gelu_erf(linear(x, c + 'transform.dense')), sd, c + 'transform.LayerNorm', 1e-12)
  return linear(x, c + 'decoder')


# ------------------------------------------ Tests.

@pytest.mark.parametrize('kind', ['gpt', 'bert'])
def test_state_dict_has_hf_names_and_computes_the_same_logits(kind):
  model = tiny_model(kind)
  to_hf = hf_convert.gpt2_to_hf if kind == 'gpt' else hf_convert.bert_to_hf
  sd = to_hf(params_of(model))
  want = hf_gpt2_names() if kind == 'gpt' else hf_bert_names()
  assert {name: value.shape for name, value in sd.items()} == want
  tokens = np.random.default_rng(1).integers(0, VOCAB, (LENGTH,)).astype(np.int32)
  types = (np.arange(LENGTH) >= 5).astype(np.int32)
  forward = nnx.jit(lambda model, tokens, types: model(tokens, token_types=types)['logits'])
  if kind == 'gpt':
    ours, theirs = forward(model, tokens[None], None)[0], hf_gpt2_logits(sd, tokens)
  else:
    ours = forward(model, tokens[None], types[None])[0]
    theirs = hf_bert_logits(sd, tokens, types)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kind', ['gpt', 'bert'])
def test_round_trip_and_load(kind):
  source, target = tiny_model(kind, seed=0), tiny_model(kind, seed=1)
  to_hf = hf_convert.gpt2_to_hf if kind == 'gpt' else hf_convert.bert_to_hf
  from_hf = hf_convert.gpt2_from_hf if kind == 'gpt' else hf_convert.bert_from_hf
  params = params_of(source)
  back = from_hf(to_hf(params), target)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  hf_convert.load_params(target, back)
  tokens = np.arange(LENGTH, dtype=np.int32)[None] % VOCAB
  np.testing.assert_array_equal(target(tokens)['logits'], source(tokens)['logits'])


def test_bert_accepts_pretraining_checkpoints_and_tf_names():
  model = tiny_model('bert')
  sd = hf_convert.bert_to_hf(params_of(model))
  # BertForPreTraining adds a pooler and the NSP head; TF-converted files say gamma/beta.
  sd['bert.pooler.dense.weight'] = np.zeros((WIDTH, WIDTH), np.float32)
  sd['cls.seq_relationship.weight'] = np.zeros((2, WIDTH), np.float32)
  sd['bert.embeddings.position_ids'] = np.arange(LENGTH)[None]
  sd['bert.embeddings.LayerNorm.gamma'] = sd.pop('bert.embeddings.LayerNorm.weight')
  sd['bert.embeddings.LayerNorm.beta'] = sd.pop('bert.embeddings.LayerNorm.bias')
  del sd['cls.predictions.decoder.weight'], sd['cls.predictions.decoder.bias']  # Tied: optional.
  back = hf_convert.bert_from_hf(sd, model)
  np.testing.assert_array_equal(back['embed_norm']['scale'],
                                params_of(model)['embed_norm']['scale'])


def test_mismatches_are_clear_errors():
  model = tiny_model('gpt')
  sd = hf_convert.gpt2_to_hf(params_of(model))
  with pytest.raises(ValueError, match=r"missing \['transformer.h.1.ln_2.bias'\]"):
    hf_convert.gpt2_from_hf({k: v for k, v in sd.items() if k != 'transformer.h.1.ln_2.bias'},
                            model)
  with pytest.raises(ValueError, match='transformer.wpe.weight has shape'):
    hf_convert.gpt2_from_hf({**sd, 'transformer.wpe.weight': np.zeros((1024, WIDTH))}, model)
  with pytest.raises(ValueError, match='lm_head.weight differs'):
    hf_convert.gpt2_from_hf({**sd, 'lm_head.weight': sd['lm_head.weight'] + 1}, model)
  # A GPT2Model checkpoint (no `transformer.` prefix, no head) loads as well.
  bare = {k.removeprefix('transformer.'): v for k, v in sd.items() if k != 'lm_head.weight'}
  np.testing.assert_array_equal(hf_convert.gpt2_from_hf(bare, model)['blocks'][1]['mlp']['fc2'][
      'kernel'], sd['transformer.h.1.mlp.c_proj.weight'])


@pytest.mark.parametrize('kind', ['gpt', 'bert'])
def test_models_without_biases_are_refused_both_ways(kind):
  # nanoGPT's bias=False model (configs/gpt.py:char) has no arrays for HF's bias names.
  model = tiny_model(kind, use_bias=False)
  to_hf = hf_convert.gpt2_to_hf if kind == 'gpt' else hf_convert.bert_to_hf
  from_hf = hf_convert.gpt2_from_hf if kind == 'gpt' else hf_convert.bert_from_hf
  with pytest.raises(ValueError, match='this model has no biases .*use_bias=False'):
    to_hf(params_of(model))
  with pytest.raises(ValueError, match='this model has no biases .*use_bias=False'):
    from_hf(to_hf(params_of(tiny_model(kind))), model)
