"""DINO: teacher EMA, no gradient to the teacher, schedules, collapse monitor, :local run."""

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dino_vit
from ssl_jax import checkpoint, methods, optim, sharding, train
from ssl_jax.methods import dino
from tests import hand_written_forms, runner


def tiny_config(**model):
  config = dino_vit.get_config('local')
  config.model.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64, out_dim=64,
                           head_hidden_dim=32, head_bottleneck_dim=16,
                           warmup_teacher_temp=0.04, teacher_temp=0.07,  # The paper's warmup.
                           warmup_teacher_temp_epochs=10.0, **model))
  config.augment.num_local_crops = 2
  config.data.batch_size = 8
  return train.resolve_config(config, num_train_examples=1437)


@pytest.fixture(scope='module')
def tiny():
  config = tiny_config()
  method = methods.create(config)
  with nnx.use_eager_sharding(False):
    model = method.build(nnx.Rngs(0))
  return config, method, model


def flat(state) -> dict[str, np.ndarray]:
  return runner.flat_dict(nnx.to_pure_dict(state))


def test_teacher_is_a_copy_outside_the_parameters(tiny):
  config, _, model = tiny
  params = flat(nnx.state(model, nnx.Param))
  assert params and all(name.startswith('student/') for name in params)
  teacher = flat(nnx.state(model.teacher, dino.TeacherWeight))
  student = flat(nnx.state(model.student, nnx.Param))
  assert teacher.keys() == student.keys()
  for name, value in student.items():
    np.testing.assert_array_equal(teacher[name], value, err_msg=name)
  np.testing.assert_array_equal(np.asarray(model.center[...]),
                                np.zeros((1, config.model.out_dim)))


def test_ema_update_matches_formula(tiny):
  config, method, model = tiny
  model = nnx.clone(model)
  rng = np.random.default_rng(0)
  student_state = nnx.state(model.student, nnx.Param)
  moved = jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32),
                       nnx.to_pure_dict(student_state))
  nnx.replace_by_pure_dict(student_state, moved)
  nnx.update(model.student, student_state)
  teacher_before = flat(nnx.state(model.teacher, dino.TeacherWeight))
  student = flat(nnx.state(model.student, nnx.Param))
  step, total = 37, config.train.steps
  momentum = 1 - (1 - config.model.teacher_momentum) * (math.cos(math.pi * step / total) + 1) / 2
  method.after_step(model, jnp.asarray(step))
  teacher_after = flat(nnx.state(model.teacher, dino.TeacherWeight))
  for name, value in teacher_after.items():
    want = momentum * teacher_before[name] + (1 - momentum) * student[name]
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6, err_msg=name)
  moved_by = teacher_after['backbone/cls_token'] - teacher_before['backbone/cls_token']
  assert np.abs(moved_by).max() > 1e-4


def test_schedules_match_the_reference_formulas(tiny):
  config, method, _ = tiny
  m, steps, per_epoch = config.model, config.train.steps, config.train.steps_per_epoch
  warmup = round(m.warmup_teacher_temp_epochs * per_epoch)
  for step, want in [(0, 0.04), (warmup // 2, 0.04 + 0.03 * (warmup // 2) / warmup),
                     (warmup, 0.07), (2 * warmup, 0.07)]:
    np.testing.assert_allclose(float(method.teacher_temperature(jnp.asarray(step))), want,
                               rtol=1e-6)
  # utils.cosine_scheduler(base, final, ...): final + (base - final) (1 + cos(pi i / n)) / 2.
  def cosine(base, final, i):
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / steps))
  wd = optim.weight_decay_schedule(config.optim)
  for step in (0, 123, steps // 2, steps):
    np.testing.assert_allclose(float(method.teacher_momentum(jnp.asarray(step))),
                               cosine(m.teacher_momentum, 1.0, step), rtol=1e-6)
    np.testing.assert_allclose(float(wd(step)), cosine(0.04, 0.4, step), rtol=1e-5)
  assert config.optim.weight_decay_steps == steps
  assert config.optim.freeze_steps == per_epoch == 1437 // 8


@pytest.mark.parametrize('warmup_steps, total_steps', [(0, 1), (1, 2), (7, 20), (1796, 17960)])
def test_optax_schedules_equal_the_hand_written_ones(warmup_steps, total_steps):
  """optax.linear_schedule / cosine_decay_schedule against the former formulas, by step."""
  steps = sorted({0, 1, 2, warmup_steps - 1, warmup_steps, warmup_steps + 1, total_steps // 2,
                  total_steps - 1, total_steps, total_steps + 1, 3 * total_steps} - {-1})
  steps = jnp.asarray(steps, jnp.int32)
  temperature = dict(start=0.04, end=0.07, warmup_steps=warmup_steps)
  np.testing.assert_allclose(
      jax.jit(jax.vmap(lambda s: dino.teacher_temperature(s, **temperature)))(steps),
      jax.vmap(lambda s: hand_written_forms.teacher_temperature(s, **temperature))(steps),
      rtol=1e-6)
  for start in (0.996, 0.9995):
    momentum = dict(start=start, total_steps=total_steps)
    got = jax.jit(jax.vmap(functools.partial(dino.teacher_momentum, **momentum)))(steps)
    want = jax.vmap(functools.partial(hand_written_forms.teacher_momentum, **momentum))(steps)
    # The EMA moves by 1 - m: that gap must agree, not only m.
    np.testing.assert_allclose(1.0 - got, 1.0 - want, rtol=1e-5, atol=1e-9)


def test_train_step_leaves_the_teacher_to_the_ema(tiny):
  """One real step: the student and center move by the loss, the teacher only by the EMA."""
  config = tiny_config()
  config.optim.schedule = 'constant'  # Warmup would start at lr 0.
  method = methods.create(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  schedule, tx = train.build_optimizer(config)
  rng = np.random.default_rng(1)
  host_views = {'global_views': rng.integers(0, 256, (8, 2, 16, 16, 1), np.uint8),
                'local_views': rng.integers(0, 256, (8, 2, 8, 8, 1), np.uint8)}
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, config.seed)
    state = train.init_train_state(method, tx, shardings, config.seed)
    before = jax.device_get(flat(state['model_state']) | flat(state['params']))
    step_fn = train.make_train_step(method, graphdef, tx, schedule, shardings, mesh)
    batch = sharding.put_batch(host_views | {'label': np.zeros(8, np.int32)}, mesh)
    state, metrics = step_fn(state, batch, jax.random.key(0))
    after = jax.device_get(flat(state['model_state']) | flat(state['params']))
  assert not any('teacher' in jax.tree_util.keystr(path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(state['opt_state'])[0])
  momentum = config.model.teacher_momentum  # Step 0 of the cosine.
  _, _, model = tiny  # The same structure; its TeacherWeight names (not BatchNorm statistics).
  teacher_names = ['teacher/' + n for n in flat(nnx.state(model.teacher, dino.TeacherWeight))]
  assert len(teacher_names) > 10
  for name in teacher_names:
    student = after['student/' + name[len('teacher/'):]]
    np.testing.assert_allclose(after[name], momentum * before[name] + (1 - momentum) * student,
                               rtol=1e-5, atol=1e-7, err_msg=name)
  # The last layer is frozen for the first epoch; the rest of the student moved.
  np.testing.assert_array_equal(after['student/head/last_layer/kernel'],
                                before['student/head/last_layer/kernel'])
  pos_embed = 'student/backbone/pos_embed'
  assert np.abs(after[pos_embed] - before[pos_embed]).max() > 0
  assert np.abs(after['center']).max() > 0  # 0.1 x the batch mean of the teacher outputs.
  for key in ('teacher_entropy', 'kl_teacher_student', 'teacher_temp', 'teacher_momentum',
              'weight_decay', 'teacher_batch_entropy'):
    assert np.isfinite(float(metrics[key])), key
  np.testing.assert_allclose(float(metrics['kl_teacher_student']),
                             float(metrics['loss']) - float(metrics['teacher_entropy']), rtol=1e-5)
  assert 0 < float(metrics['teacher_entropy']) < math.log(config.model.out_dim)


def test_collapse_monitor(tiny):
  config, method, _ = tiny
  log_k = math.log(config.model.out_dim)
  healthy = {'teacher_entropy': 0.4 * log_k, 'teacher_batch_entropy': 0.9 * log_k}
  assert method.check_metrics(healthy) == []
  uniform = method.check_metrics({'teacher_entropy': 0.97 * log_k,
                                  'teacher_batch_entropy': 0.99 * log_k})
  assert len(uniform) == 1 and 'uniform' in uniform[0]
  one_dim = method.check_metrics({'teacher_entropy': 0.01, 'teacher_batch_entropy': 0.02})
  assert len(one_dim) == 1 and 'same few dimensions' in one_dim[0]
  # The entropies themselves: uniform targets give log K, one-hot targets give 0.
  same = jnp.zeros((2, 4, config.model.out_dim))
  entropy, batch_entropy = dino.teacher_entropies(same, jnp.zeros((1, config.model.out_dim)), 0.04)
  np.testing.assert_allclose([float(entropy), float(batch_entropy)], [log_k, log_k], rtol=1e-5)
  spiky = jnp.zeros((2, 4, config.model.out_dim)).at[..., 3].set(100.0)
  entropy, batch_entropy = dino.teacher_entropies(spiky, jnp.zeros((1, config.model.out_dim)), 0.04)
  assert float(entropy) < 1e-3 and float(batch_entropy) < 1e-3


def test_attention_picture_and_features(tiny):
  config, method, model = tiny
  images = np.random.default_rng(2).integers(0, 256, (8, 16, 16, 1), np.uint8)
  # The first global crop of each image, as the host cut it.
  batch = {'global_views': jnp.asarray(np.stack([images, 255 - images], axis=1))}
  arrays = method.visualize(model, batch, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(arrays['images']), (images / 255 - 0.5) / 0.5, atol=1e-6)
  attention = np.asarray(arrays['attention'])
  assert attention.shape == (8, config.model.num_heads, 4, 4)
  # [CLS] -> patch weights: a softmax row without its [CLS] -> [CLS] entry.
  assert np.all(attention > 0) and np.all(attention.sum(axis=(2, 3)) < 1)
  picture = method.render(arrays)
  # 8 rows of (image + one heat map per head), each enlarged to 64 px (a patch: 16 px).
  assert picture.shape == (8 * 66 + 2, (1 + config.model.num_heads) * 66 + 2, 3)
  first_map = picture[2:66, 68:132]  # Image 0, head 0.
  row, col = np.unravel_index(attention[0, 0].argmax(), (4, 4))
  np.testing.assert_array_equal(first_map[16 * row + 8, 16 * col + 8], [255, 255, 255])
  row, col = np.unravel_index(attention[0, 0].argmin(), (4, 4))
  np.testing.assert_array_equal(first_map[16 * row + 8, 16 * col + 8], [0, 0, 0])
  encoder = method.encoder(model)
  assert not nnx.state(encoder, dino.TeacherWeight)
  features = method.features(encoder, jnp.asarray(images))
  np.testing.assert_allclose(
      np.asarray(features),
      np.asarray(model.teacher.backbone(
          (jnp.asarray(images, jnp.float32) / 255 - 0.5) / 0.5)['cls']), rtol=1e-5, atol=1e-6)


def check_local_run(workdir, result, steps: int, *, min_knn: float) -> dict:
  """What a DINO :local run must show; returns the final eval record."""
  assert result.returncode == 0, result.stdout + result.stderr
  records = runner.read_metrics(workdir)
  train_records = [r for r in records if 'loss' in r]
  assert train_records[-1]['step'] == steps
  log_k = math.log(dino_vit.get_config('local').model.out_dim)
  # Not collapsed: the teacher's targets are neither uniform nor all alike.
  final = train_records[-1]
  assert final['teacher_entropy'] < 0.9 * log_k, final
  assert final['teacher_batch_entropy'] > 0.5 * log_k, final
  assert 'collapse warning' not in result.stdout
  assert min(r['loss'] for r in train_records) < train_records[0]['loss'] - 0.5
  scores = [r for r in records if 'knn_top1' in r][-1]
  assert scores['knn_top1'] > scores['knn_top1_random_init'] + 0.05, scores
  assert scores['knn_top1'] > min_knn, scores  # Ten classes: chance is 0.1.
  pictures = list((workdir / 'images').glob('step_*.png'))
  assert pictures and pictures[0].stat().st_size > 0
  # The export is the teacher's backbone: reloaded, it gives the logged kNN accuracy.
  encoder, method = methods.load_encoder(workdir / 'export')
  config = checkpoint.load_config(workdir / 'export' / 'config.json')
  mesh = sharding.make_mesh(sharding.mesh_config())
  assert abs(runner.knn_top1(config, method, encoder, mesh) - scores['knn_top1']) <= 1 / 360
  return scores


@pytest.mark.slow
def test_local_config_learns(tmp_path):
  """The :local job exactly as a user runs it."""
  start = time.time()
  result = runner.run_main(tmp_path, config='configs/dino_vit.py:local', fast_compile=False)
  scores = check_local_run(tmp_path, result, 500, min_knn=0.65)
  assert scores['linear_top1'] > 0.8, scores
  print(f'\nDINO :local wall time {time.time() - start:.0f} s; {scores}')
