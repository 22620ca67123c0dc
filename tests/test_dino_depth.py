"""DINO's ViT as facebookresearch/dino builds it: stochastic depth on the student only, its init."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dino_vit
from ssl_jax import methods, train
from ssl_jax.models import regularizers
from ssl_jax.models import vit as vit_lib
from ssl_jax.models.vit import ViT


@pytest.fixture(autouse=True)
def no_eager_sharding():
  """Modules built outside a mesh (as test_mae.py does)."""
  with nnx.use_eager_sharding(False):
    yield


def tiny_dino(drop_path_rate: float):
  config = dino_vit.get_config('local')
  config.model.update(dict(width=32, depth=4, num_heads=2, mlp_dim=64, out_dim=64,
                           head_hidden_dim=32, head_bottleneck_dim=16,
                           drop_path_rate=drop_path_rate))
  config.augment.num_local_crops = 2
  config.data.batch_size = 8
  config = train.resolve_config(config, num_train_examples=1437)
  method = methods.create(config)
  return config, method, method.build(nnx.Rngs(0))


# ------------------------------------------------------------------ drop path ---
def test_drop_path_rates_rise_linearly_over_the_blocks():
  """torch.linspace(0, drop_path_rate, depth) (dino vision_transformer.py line 150)."""
  vit = ViT(patch_size=4, channels=1, width=8, depth=4, num_heads=2, mlp_dim=16,
            drop_path_rate=0.3, rngs=nnx.Rngs(0))
  np.testing.assert_allclose([b.drop_path_rate for b in vit.encoder.blocks],
                             [0.0, 0.1, 0.2, 0.3], atol=1e-12)
  np.testing.assert_allclose(regularizers.drop_path_rates(0.1, 12), np.arange(12) * 0.1 / 11)
  plain = ViT(patch_size=4, channels=1, width=8, depth=2, num_heads=2, mlp_dim=16,
              rngs=nnx.Rngs(0))  # MAE's default: none.
  assert [b.drop_path_rate for b in plain.encoder.blocks] == [0.0, 0.0]


def _block_masks(block, h: np.ndarray, out: np.ndarray, keep_prob: float):
  """Which branches (attn, mlp) of `block` were kept for each example, from its output.

  Recomputes x + ka * attn(norm1(x)), then + km * mlp(norm2(.)) for the four
  choices ka, km in {0, 1 / keep_prob} and returns the one matching `out`.
  """
  attended = np.asarray(block.attn(block.norm1(jnp.asarray(h)))[0])
  candidates, choices = [], []
  for ka in (0.0, 1.0 / keep_prob):
    x1 = h + ka * attended
    branch = np.asarray(block.mlp(block.norm2(jnp.asarray(x1))))
    for km in (0.0, 1.0 / keep_prob):
      candidates.append(x1 + km * branch)
      choices.append((ka > 0, km > 0))
  errors = np.stack([np.abs(c - out).max(axis=(1, 2)) for c in candidates])  # (4, B)
  best = errors.argmin(axis=0)
  assert errors.min(axis=0).max() < 1e-4  # Every example is one of the four cases...
  assert np.sort(errors, axis=0)[1].min() > 1e-3  # ...and only one.
  return np.array([choices[i] for i in best])  # (B, 2) kept flags


def test_each_block_drops_its_branches_per_example_at_its_rate():
  """Empirical drop fractions over 2,000 examples, block by block, kept ones scaled by 1/keep."""
  depth, rate, batch = 4, 0.6, 2000
  transformer = vit_lib.Transformer(8, depth, 2, 16, dtype=jnp.float32, drop_path_rate=rate,
                                    rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(batch, 3, 8)).astype(np.float32)
  key = jax.random.key(7)
  h = x
  for i, block in enumerate(transformer.blocks):
    out, _ = block(jnp.asarray(h), jax.random.fold_in(key, i))  # As Transformer keys block i.
    out = np.asarray(out)
    block_rate = rate * i / (depth - 1)
    kept = _block_masks(block, h, out, 1.0 - block_rate)
    dropped = 1.0 - kept.mean(axis=0)  # (attn, mlp) fractions
    # 4.5 binomial standard deviations at p = 0.5, n = 2000: 0.05.
    np.testing.assert_allclose(dropped, [block_rate, block_rate], atol=0.05, err_msg=f'block {i}')
    if i == 0:
      assert dropped.max() == 0.0  # Rate 0: never.
    else:  # The two branches draw independently (two DropPath calls per block).
      agree = (kept[:, 0] == kept[:, 1]).mean()
      assert abs(agree - (block_rate**2 + (1 - block_rate)**2)) < 0.05
    h = out
  got, _ = transformer(jnp.asarray(x), key)  # The whole stack, same key: the same masks.
  np.testing.assert_allclose(np.asarray(got), np.asarray(transformer.norm(jnp.asarray(h))),
                             rtol=1e-5, atol=1e-5)
  deterministic, _ = transformer(jnp.asarray(x))
  assert np.abs(np.asarray(deterministic) - np.asarray(got)).max() > 0.1


def test_drop_path_masks_do_not_depend_on_sharding():
  """The mask is drawn for the global batch: 8 shards give the 1-device values."""
  x = jnp.ones((64, 3, 4), jnp.float32)
  key = jax.random.key(3)
  fn = jax.jit(lambda x, key: regularizers.drop_path(x, 0.5, key))
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))
  one = np.asarray(fn(jax.device_put(x, jax.devices()[0]), key))
  eight = fn(sharded, key)
  assert len(eight.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(eight), one)
  assert set(np.unique(one)) == {0.0, 2.0}  # Dropped, or kept and scaled by 1 / 0.5.


# ------------------------------------------------- student, teacher and eval ---
def test_only_the_student_drops_paths():
  """Teacher and exported encoder: rate 0 in every block; student: linear to the config."""
  config, method, model = tiny_dino(0.3)
  np.testing.assert_allclose([b.drop_path_rate for b in model.student.backbone.encoder.blocks],
                             [0.0, 0.1, 0.2, 0.3], atol=1e-12)
  assert [b.drop_path_rate for b in model.teacher.backbone.encoder.blocks] == [0.0] * 4
  assert [b.drop_path_rate for b in method.encoder(model).encoder.blocks] == [0.0] * 4
  assert [b.drop_path_rate for b in method.build_encoder(nnx.Rngs(0)).encoder.blocks] == [0.0] * 4
  crops = [jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 16, 16, 1)), jnp.float32)]
  teacher = np.asarray(model.teacher(crops))
  for seed in range(3):  # Even handed a key, the teacher runs whole.
    np.testing.assert_array_equal(
        np.asarray(model.teacher(crops, drop_path_key=jax.random.key(seed))), teacher)
  # The student in train mode (a key) differs from its deterministic output; keys differ.
  student = np.asarray(model.student(crops))
  train_a = np.asarray(model.student(crops, drop_path_key=jax.random.key(0)))
  train_b = np.asarray(model.student(crops, drop_path_key=jax.random.key(1)))
  assert np.abs(train_a - student).max() > 1e-3 and np.abs(train_a - train_b).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(model.student(crops)), student)  # Eval: fixed.


def test_loss_fn_drops_student_paths_but_not_teacher_paths(monkeypatch):
  """With the views fixed, the rng changes the student (loss) but not the teacher (center)."""
  config, method, model = tiny_dino(0.3)
  rng = np.random.default_rng(2)
  global_views = jnp.asarray(rng.normal(size=(2, 8, 16, 16, 1)), jnp.float32)
  local_views = jnp.asarray(rng.normal(size=(2, 8, 8, 8, 1)), jnp.float32)
  monkeypatch.setattr(method, 'views', lambda *args, **kwargs: (global_views, local_views))
  batch = {'image': np.zeros((8, 16, 16, 1), np.uint8)}
  results = []
  for seed in (0, 1):
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state, copy=True)
    loss, _ = method.loss_fn(copy, batch, jax.random.key(seed), jnp.asarray(0))
    results.append((float(loss), np.asarray(copy.center[...])))
  assert abs(results[0][0] - results[1][0]) > 1e-4  # The student dropped other paths.
  np.testing.assert_array_equal(results[0][1], results[1][1])  # The teacher did not.
  assert np.abs(results[0][1]).max() > 0


# ----------------------------------------------------------------------- init ---
def _vit(init: str) -> ViT:
  return ViT(patch_size=4, channels=3, width=192, depth=2, num_heads=3, mlp_dim=768,
             posemb='learned', image_size=16, init=init, rngs=nnx.Rngs(0))


def test_dino_init_statistics_and_mae_default():
  """dino vision_transformer.py _init_weights: trunc-normal 0.02 linears, zero biases, LN 1/0."""
  dino, mae = _vit('dino'), _vit('mae')
  for block in dino.encoder.blocks:
    for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
      assert abs(float(jnp.std(layer.kernel[...])) - 0.02) < 0.001
      assert abs(float(jnp.mean(layer.kernel[...]))) < 0.001
      np.testing.assert_array_equal(np.asarray(layer.bias[...]), 0.0)
    for norm in (block.norm1, block.norm2):
      np.testing.assert_array_equal(np.asarray(norm.scale[...]), 1.0)
      np.testing.assert_array_equal(np.asarray(norm.bias[...]), 0.0)
  assert abs(float(jnp.std(dino.cls_token[...])) - 0.02) < 0.004  # 192 values.
  # The patch Conv2d keeps torch's default: weight and bias U(+-1/sqrt(C * p * p)).
  bound = 1.0 / math.sqrt(3 * 4 * 4)
  for values in (dino.patch_embed.kernel[...], dino.patch_embed.bias[...]):
    assert float(jnp.abs(values).max()) <= bound
  assert abs(float(jnp.std(dino.patch_embed.kernel[...])) - bound / math.sqrt(3)) < 0.003
  assert float(jnp.abs(dino.patch_embed.bias[...]).max()) > 0.5 * bound
  # MAE (the default) is unchanged: xavier-uniform fc1, zero patch bias.
  fc1 = mae.encoder.blocks[0].mlp.fc1.kernel[...]
  xavier_bound = math.sqrt(6.0 / (192 + 768))
  assert float(jnp.abs(fc1).max()) <= xavier_bound
  assert abs(float(jnp.std(fc1)) - xavier_bound / math.sqrt(3)) < 0.002
  np.testing.assert_array_equal(np.asarray(mae.patch_embed.bias[...]), 0.0)
  default = ViT(patch_size=4, channels=3, width=192, depth=2, num_heads=3, mlp_dim=768,
                posemb='learned', image_size=16, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(default.encoder.blocks[0].mlp.fc1.kernel[...]),
                                np.asarray(fc1))
  with pytest.raises(ValueError, match='init'):
    _vit('xavier')


def test_dino_method_builds_a_dino_initialised_student():
  _, method, model = tiny_dino(0.1)
  fc1 = model.student.backbone.encoder.blocks[0].mlp.fc1.kernel[...]  # (32, 64)
  assert abs(float(jnp.std(fc1)) - 0.02) < 0.003  # xavier would be sqrt(2 / 96) = 0.14.
  fc1_export = method.build_encoder(nnx.Rngs(0)).encoder.blocks[0].mlp.fc1.kernel[...]
  assert abs(float(jnp.std(fc1_export)) - 0.02) < 0.003


# -------------------------------------------------------------------- configs ---
def test_drop_path_in_the_config_variants():
  assert dino_vit.get_config().model.drop_path_rate == 0.1  # main_dino.py default.
  assert dino_vit.get_config('vit_b16').model.drop_path_rate == 0.1
  assert dino_vit.get_config('local').model.drop_path_rate == 0.1  # Measured: see _local.


def test_boosted_vit_s16_variant_is_the_readme_command():
  """README.md line 197: --arch vit_small --epochs 300 --teacher_temp 0.07
  --warmup_teacher_temp_epochs 30 --norm_last_layer false, on 16 GPUs x 64."""
  config = dino_vit.get_config('vit_s16_300ep')
  m = config.model
  assert (m.patch_size, m.width, m.depth, m.num_heads, m.mlp_dim) == (16, 384, 12, 6, 1536)
  assert config.train.epochs == 300.0
  assert (m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs) == (
      0.04, 0.07, 30.0)
  assert m.norm_last_layer is False
  assert m.drop_path_rate == 0.1 and m.out_dim == 65536 and m.student_temp == 0.1
  assert config.augment.num_local_crops == 8  # main_dino.py's default; the command keeps it.
  assert config.data.batch_size == 1024 and config.optim.lr == 5e-4
  assert config.optim.weight_decay == 0.04 and config.optim.weight_decay_end == 0.4
  assert config.optim.freeze_epochs == 1 and config.optim.grad_clip_norm == 3.0
  # The head's last layer gets its trainable norm g (weight_g), in student and teacher.
  config = train.resolve_config(config, num_train_examples=1281167)
  assert config.train.steps == 300 * (1281167 // 1024)
  method = methods.create(config)
  abstract = nnx.eval_shape(lambda: method.build(nnx.Rngs(0)))
  assert abstract.student.head.last_layer.scale.shape == (1, 65536)
  assert abstract.teacher.head.last_layer.scale.shape == (1, 65536)
  assert dino_vit.get_config().model.norm_last_layer is True


def test_default_variant_is_the_readme_vanilla_command():
  """README.md lines 162-165: main_dino.py --arch vit_small on 8 GPUs, every other flag its
  default (lines 57-117): 8 local crops, teacher temperature 0.04 throughout, batch 8 x 64."""
  config = dino_vit.get_config()
  m = config.model
  assert (m.patch_size, m.width, m.depth, m.num_heads) == (16, 384, 12, 6)
  assert (m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs) == (
      0.04, 0.04, 0.0)
  assert config.augment.num_local_crops == 8
  assert tuple(config.augment.global_crop_scale) == (0.4, 1.0)
  assert tuple(config.augment.local_crop_scale) == (0.05, 0.4)
  assert config.data.batch_size == 512 and config.train.epochs == 100.0
  assert m.norm_last_layer is True and m.teacher_momentum == 0.996
  assert config.optim.lr == 5e-4 and config.optim.min_lr == 1e-6
  assert dino_vit.get_config('vit_b16').data.batch_size == 1024
