"""GPT and BERT as methods: sharded train step, held-out sums, vocabulary, FLOPs, init_from."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs import bert_mlm, gpt
from ssl_jax import checkpoint, losses, methods, sharding, train
from ssl_jax import optim as optim_lib
from ssl_jax.data import streams, text_sources
from ssl_jax.errors import CheckpointError, ConfigError
from ssl_jax.models import lm
from ssl_jax.models.transformer import count_params
from tests.test_transformer import np_mlp

VOCAB, LENGTH, BATCH, LR = 64, 16, 16, 1e-2
CONFIGS = {'gpt': gpt.get_config, 'bert': bert_mlm.get_config}


def tiny_config(kind: str, mesh_shape=None, **model):
  """The :local recipe shrunk: 2 blocks of width 32 with 8 heads (tensor=2 splits them)."""
  config = CONFIGS[kind]('local')
  config.data.update(dict(batch_size=BATCH, seq_len=LENGTH))
  config.model.update(dict(vocab_size=VOCAB, max_len=LENGTH, width=32, depth=2, num_heads=8,
                           mlp_dim=64))
  config.model.update(model)
  config.optim.update(dict(schedule='constant', lr=LR))
  config.mesh.update(mesh_shape or dict(data=1, fsdp=1, tensor=1))
  return train.resolve_config(config, num_train_examples=1000)


def random_batch(kind: str, seed: int) -> dict[str, np.ndarray]:
  """A batch as the text pipeline makes it, with padding at the end of some windows."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  lengths = rng.integers(LENGTH // 2, LENGTH + 1, BATCH)
  real = np.arange(LENGTH)[None] < lengths[:, None]  # (B, T)
  if kind == 'gpt':
    weights = real.astype(np.float32)
    weights[:, 0] = 0.0
    return {'tokens': tokens, 'weights': weights}
  chosen = real & (rng.random((BATCH, LENGTH)) < 0.3)
  inputs = np.where(chosen & (rng.random((BATCH, LENGTH)) < 0.8), 3, tokens).astype(np.int32)
  return {'inputs': inputs, 'labels': tokens, 'weights': chosen.astype(np.float32),
          'token_types': np.zeros((BATCH, LENGTH), np.int32), 'key_mask': real}


def run_steps(config, devices, num_steps=2):
  """Losses and metrics of `num_steps` real trainer steps, the final params and shard shapes."""
  kind = config.method
  method = methods.create(config)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  schedule, tx = train.build_optimizer(config)
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, config.seed)
    state = train.init_train_state(method, tx, shardings, config.seed)
    step_fn = train.make_train_step(method, graphdef, tx, schedule, shardings, mesh)
    metrics = []
    for i in range(num_steps):
      batch = sharding.put_batch(random_batch(kind, i), mesh)
      state, step_metrics = step_fn(state, batch, jax.random.key(7))
      metrics.append({k: float(v) for k, v in step_metrics.items()})
    params = jax.device_get(nnx.to_pure_dict(state['params']))
    shard_shapes = jax.tree.map(lambda x: x.sharding.shard_shape(x.shape),
                                nnx.to_pure_dict(state['params']))
  return metrics, params, shard_shapes


# Dropout on (GPT) and BERT's gathered head: both must be the same on 8 devices.
MODEL = {'gpt': dict(dropout_rate=0.1), 'bert': dict(dropout_rate=0.1, max_predictions_per_seq=4)}


@functools.cache
def one_device_run(kind: str):
  return run_steps(tiny_config(kind, **MODEL[kind]), jax.devices()[:1])


@pytest.mark.parametrize('kind', ['gpt', 'bert'])
def test_eight_devices_match_one(kind):
  mesh_shape = dict(data=2, fsdp=2, tensor=2)
  metrics_1, params_1, _ = one_device_run(kind)
  metrics_8, params_8, shards = run_steps(tiny_config(kind, mesh_shape, **MODEL[kind]),
                                          jax.devices())
  for name in metrics_1[0]:
    np.testing.assert_allclose([m[name] for m in metrics_8], [m[name] for m in metrics_1],
                               rtol=1e-5, atol=1e-6, err_msg=name)
  assert metrics_1[1]['loss'] != metrics_1[0]['loss']  # The first step changed the parameters.
  flat_1 = jax.tree_util.tree_flatten_with_path(params_1)[0]
  for (path, p1), p8 in zip(flat_1, jax.tree.leaves(params_8), strict=True):
    names = [getattr(k, 'key', None) for k in path]
    # The key bias gets no gradient (softmax ignores a constant); Adam turns float noise
    # there into updates of up to lr per step.
    atol = 2 * LR if 'qkv' in names and 'bias' in names else 1e-5
    np.testing.assert_allclose(p8, p1, rtol=1e-4, atol=atol, err_msg=jax.tree_util.keystr(path))
  # Heads, MLP units and the vocabulary are split over `tensor`, the width over `fsdp`.
  assert shards['blocks'][0]['attn']['qkv']['kernel'] == (16, 3, 4, 4)
  assert shards['blocks'][0]['mlp']['fc1']['kernel'] == (16, 32)
  assert shards['token_embed']['embedding'] == (VOCAB // 2, 16)
  if kind == 'bert':  # Some windows chose more than 4 positions, on 8 devices as on 1.
    assert metrics_1[0]['predictions_dropped'] > 0


# ---------------------------------------------------------------- held-out sums.

def log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  shifted = x - x.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def built(config, seed: int = 0):
  method = methods.create(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    return method, method.build(nnx.Rngs(seed))


def test_gpt_eval_step_sums_next_token_cross_entropy():
  method, model = built(tiny_config('gpt'))
  batch = random_batch('gpt', 3)
  total, count = nnx.jit(lambda m, b: method.eval_step(m, b)['loss'])(model, batch)
  logits = np.asarray(model(jnp.asarray(batch['tokens']))['logits'])
  tokens, weights = batch['tokens'], batch['weights']
  cross_entropy = -np.take_along_axis(log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
  assert float(count) == weights[:, 1:].sum() < BATCH * (LENGTH - 1)  # Padding is left out.
  np.testing.assert_allclose(float(total), (cross_entropy * weights[:, 1:]).sum(), rtol=1e-5)


def test_gpt_loss_skips_the_last_positions_logits_but_not_their_value():
  """loss_fn computes logits at the T-1 positions with a target: the loss and gradients of the
  full (B, T, V) logits."""
  method, model = built(tiny_config('gpt'))
  batch = {key: jnp.asarray(value) for key, value in random_batch('gpt', 4).items()}

  def full(m):
    return losses.next_token_loss(m(batch['tokens'])['logits'], batch['tokens'], batch['weights'])

  def ours(m):
    return method.loss_fn(m, batch, jax.random.key(0), jnp.zeros((), jnp.int32))[0]

  (want, want_grads), (got, got_grads) = (nnx.jit(nnx.value_and_grad(f))(model)
                                          for f in (full, ours))
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(g, w, atol=1e-6)


@pytest.mark.parametrize('max_predictions', [None, LENGTH - 1, 3])
def test_bert_eval_step_sums_masked_loss_and_accuracy(max_predictions):
  method, model = built(tiny_config('bert', max_predictions_per_seq=max_predictions))
  batch = random_batch('bert', 4)
  sums = nnx.jit(method.eval_step)(model, batch)
  logits = np.asarray(model(jnp.asarray(batch['inputs']), token_types=batch['token_types'],
                            key_mask=batch['key_mask'])['logits'])
  weights = batch['weights']
  if max_predictions:  # The head sees only each window's first k chosen positions.
    weights = weights * (np.cumsum(weights, axis=1) <= max_predictions)
  labels = batch['labels']
  cross_entropy = -np.take_along_axis(log_softmax(logits), labels[..., None], -1)[..., 0]
  correct = logits.argmax(-1) == labels
  assert float(sums['loss'][1]) == float(sums['masked_accuracy'][1]) == weights.sum() > 0
  np.testing.assert_allclose(float(sums['loss'][0]), (cross_entropy * weights).sum(), rtol=1e-5)
  assert float(sums['masked_accuracy'][0]) == (correct * weights).sum()
  if max_predictions == 3:
    assert weights.sum() < batch['weights'].sum()


# ---------------------------------------------------------------- vocabulary, FLOPs.

@pytest.mark.parametrize('kind,model,head_positions', [
    ('gpt', {}, LENGTH), ('bert', {}, LENGTH),  # :local's 40 predictions cover all 16.
    ('bert', dict(max_predictions_per_seq=4), 4),
    ('gpt', dict(use_bias=False, gelu='erf'), LENGTH), ('bert', dict(use_bias=False), LENGTH)])
def test_flops_count_every_parameter_once(kind, model, head_positions):
  method, built_model = built(tiny_config(kind, **model))
  body, head = method.matmul_params()
  lookups = LENGTH * 32 + (2 * 32 if kind == 'bert' else 0)  # Positions (+ token types).
  assert body + head + lookups == count_params(built_model)
  assert method.train_flops_per_example() == (
      6 * (body * LENGTH + head * head_positions) + 12 * 2 * LENGTH ** 2 * 32)
  assert method.examples_to_units(BATCH) == BATCH * LENGTH


def test_model_vocabulary_is_the_tokenizers(tmp_path):
  config = gpt.get_config('local')
  config.data.update(dict(tokenizer='char', batch_size=8, seq_len=32))
  method = methods.create(config)
  data = train_data(config, tmp_path)
  vocab = text_sources.tokenized_text(config.data, str(tmp_path)).tokenizer.vocab_size
  assert data.config_updates == {'model.vocab_size': vocab} and 50 < vocab < 200
  resolved = train.resolve_config(config, data.num_examples, data.config_updates)
  assert resolved.model.vocab_size == vocab and config.model.vocab_size is None
  assert methods.create(resolved).transformer_config().vocab_size == vocab
  with pytest.raises(ConfigError, match='config.model.vocab_size is unset'):
    method.transformer_config()
  config.model.vocab_size = vocab + 5  # Padded, as nanoGPT's 50304: kept.
  assert train_data(config, tmp_path).config_updates == {}
  config.model.vocab_size = vocab - 1
  with pytest.raises(ConfigError, match=f'smaller than the tokenizer.s {vocab} ids'):
    train_data(config, tmp_path)
  config.model.vocab_size, config.data.seq_len = None, 129
  with pytest.raises(ConfigError, match='seq_len=129 exceeds config.model.max_len=128'):
    train_data(config, tmp_path)
  config.data.objective = 'masked_lm'
  with pytest.raises(ConfigError, match="objective='masked_lm', but method 'gpt' trains"):
    train_data(config, tmp_path)


def train_data(config, workdir):
  """The trainer's train data for `config` (built before any method object)."""
  return streams.train_data(config, methods.method_class(config).data_spec(config), workdir)


# ---------------------------------------------------------------- init_from errors.

def save_train_state(workdir, step: int, state: dict) -> None:
  """`state` (+ step) as the trainer's Checkpointer lays it out, without the data iterator item."""
  manager = ocp.CheckpointManager(workdir / 'checkpoints', item_names=('state',))
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(
      {'step': jnp.int32(step), **state})))
  manager.wait_until_finished()
  manager.close()


def assert_same_variables(model: nnx.Module, reference: nnx.Module) -> None:
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reference)),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_load_weights_reports_mismatches_and_missing_sources(tmp_path):
  config = tiny_config('gpt')
  _, model = built(config)
  save_train_state(tmp_path / 'run', 5, {'params': nnx.state(model, nnx.Param)})
  _, wider = built(tiny_config('gpt', mlp_dim=128))
  with pytest.raises(CheckpointError, match=r'blocks/0/mlp/fc1/kernel: saved \(32, 64\), '
                                            r'this model \(32, 128\)'):
    checkpoint.load_weights(tmp_path / 'run', wider, wider)
  _, other = built(tiny_config('gpt'), seed=1)
  assert 'checkpoints/5' in checkpoint.load_weights(tmp_path / 'run', other, other)
  assert_same_variables(other, model)
  # An export (the whole language model for GPT and BERT) loads the same way.
  checkpoint.export_encoder(tmp_path / 'export', model, config)
  _, third = built(tiny_config('gpt'), seed=2)
  assert 'exported encoder' in checkpoint.load_weights(tmp_path / 'export', third, third)
  assert_same_variables(third, model)
  with pytest.raises(CheckpointError, match='neither a workdir .* nor an export'):
    checkpoint.load_weights(tmp_path / 'nowhere', other, other)


def test_load_weights_from_a_workdir_takes_every_model_variable(tmp_path):
  """BatchNorm statistics (and DINO's teacher, center) come with the parameters."""
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.BatchNorm(4, rngs=rngs)

  trained = Net(nnx.Rngs(0))
  trained.norm.mean.value = jnp.arange(4.0)
  trained.norm.var.value = jnp.full((4,), 2.5)
  _, params, model_state = nnx.split(trained, nnx.Param, ...)
  save_train_state(tmp_path / 'run', 3, {'params': params, 'model_state': model_state})
  fresh = Net(nnx.Rngs(1))
  assert 'checkpoints/3' in checkpoint.load_weights(tmp_path / 'run', fresh, fresh)
  assert_same_variables(fresh, trained)


# ---------------------------------------------------------------- :char is nanoGPT's model.
# karpathy/nanoGPT at 3adf61e: config/train_shakespeare_char.py (char.py), train.py, model.py.

def abstract_model(config):
  """The method and its model as shapes only (nothing allocated), on a 1-device mesh."""
  method = methods.create(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    return method, nnx.eval_shape(lambda: method.build(nnx.Rngs(0)))


def named_leaves(tree) -> dict:
  """{"['blocks'][0]['mlp']['fc1']['kernel']": leaf, ...} of a nested dict."""
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def named_params(model) -> dict:
  return named_leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def char_config():
  config = gpt.get_config('char')
  config.model.vocab_size = 65  # nanoGPT's data/shakespeare_char/prepare.py L66.
  return train.resolve_config(config, num_train_examples=1_000_000 // 256)


def test_char_is_nanogpts_recipe_and_model():
  config = char_config()
  # char.py L18-33, train.py L60-63 (weight decay, beta1, grad clip: not overridden).
  assert (config.model.depth, config.model.num_heads, config.model.width) == (6, 6, 384)
  assert (config.model.mlp_dim, config.model.max_len, config.data.seq_len) == (1536, 256, 256)
  assert (config.model.dropout_rate, config.data.batch_size, config.train.steps) == (0.2, 64, 5000)
  optim = config.optim
  assert (optim.lr, optim.min_lr, optim.warmup_steps, optim.b1, optim.b2) == (
      1e-3, 1e-4, 100, 0.9, 0.99)
  assert (optim.weight_decay, optim.grad_clip_norm, optim.lr_scaling) == (0.1, 1.0, 'none')
  assert (config.train.eval_every, config.train.log_every) == (250, 10)
  # train.py L231-242 get_lr: the same cosine from warmup_iters to lr_decay_iters = max_iters;
  # its warmup is lr (it + 1) / (warmup + 1) where ours is lr it / warmup.
  def nanogpt_lr(it):
    if it < 100:
      return 1e-3 * (it + 1) / 101
    return 1e-4 + 0.5 * (1 + math.cos(math.pi * (it - 100) / 4900)) * (1e-3 - 1e-4)
  schedule, _ = train.build_optimizer(config)
  ours = np.array([float(schedule(it)) for it in range(0, 5001, 50)])
  want = np.array([nanogpt_lr(it) for it in range(0, 5001, 50)])
  np.testing.assert_allclose(ours[2:], want[2:], rtol=1e-5)  # From step 100 on.
  assert np.abs(ours[:2] - want[:2]).max() <= 1e-3 / 101 + 1e-9
  # model.py L18-27, L35-37, L82-84 with bias=False (train.py L56): no bias anywhere.
  method, model = abstract_model(config)
  params = named_params(model)
  assert (method.transformer_config().use_bias, method.transformer_config().gelu) == (False, 'erf')
  assert not [name for name in params if 'bias' in name]
  assert {name for name in params if 'norm' in name} == {
      f"['blocks'][{i}]['norm{j}']['scale']" for i in range(6) for j in (1, 2)} | {
      "['final_norm']['scale']"}
  # nanoGPT prints "number of parameters: 10.65M", all but the position embedding
  # (model.py L150-160), and decays the 26 tensors of >= 2 dimensions, 10,740,096 scalars,
  # but not the 13 LayerNorm gains, 4,992 scalars (model.py L268-278).
  assert count_params(model) - 256 * 384 == 10_646_784
  decayed = named_leaves(optim_lib.decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  sizes = {name: math.prod(leaf.shape) for name, leaf in params.items()}
  assert [sum(1 for n in decayed if decayed[n] == d) for d in (True, False)] == [26, 13]
  assert [sum(sizes[n] for n in decayed if decayed[n] == d) for d in (True, False)] == [
      10_740_096, 4_992]


def test_char_mlp_is_erf_gelu_without_biases():
  config = char_config()
  method = methods.create(config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    mlp = lm.block(method.transformer_config(), rngs=nnx.Rngs(0)).mlp  # The LM's own Mlp.
  params = jax.tree.map(lambda a: np.asarray(a, np.float64),
                        nnx.to_pure_dict(nnx.state(mlp, nnx.Param)))
  assert params['fc1'].keys() == params['fc2'].keys() == {'kernel'}
  x = np.random.default_rng(0).normal(0, 8, (2, 4, 384))  # Pre-activations of std ~3.
  ours = np.asarray(mlp(jnp.asarray(x, jnp.float32)), np.float64)
  want = np_mlp(x, params, 'erf')
  np.testing.assert_allclose(ours, want, atol=1e-5)
  assert np.abs(ours - np_mlp(x, params, 'tanh')).max() > 1e-4  # tanh GELU would fail.


def test_default_gpt_keeps_gpt2s_biases_and_tanh_gelu():
  config = gpt.get_config()
  config.model.vocab_size = 50257
  method, model = abstract_model(config)
  assert (method.transformer_config().use_bias, method.transformer_config().gelu) == (True, 'tanh')
  params = named_params(model)
  for layer in ("['attn']['qkv']", "['attn']['proj']", "['mlp']['fc1']", "['mlp']['fc2']",
                "['norm1']", "['norm2']"):
    assert f"['blocks'][11]{layer}['bias']" in params
  assert count_params(model) == 124_439_808  # Hugging Face gpt2 with the head tied to wte.
