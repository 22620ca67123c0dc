"""The benchmark CLI (python -m ssl_jax.bench), progress-line input wait and profiler traces."""

import collections
import json
import math
import pathlib
import subprocess
import sys

import ml_collections

from ssl_jax import flops, profiling
from tests import runner

# The :local recipes with one narrow block (tests/runner.py TINY, tests/test_text_main.py TINY).
MAE_TINY = ('--config.data.batch_size=32', '--config.model.width=32', '--config.model.depth=1',
            '--config.model.mlp_dim=64', '--config.model.decoder_width=32',
            '--config.model.decoder_depth=1', '--config.model.decoder_mlp_dim=64')
GPT_TINY = ('--config.model.width=32', '--config.model.depth=1', '--config.model.mlp_dim=64',
            '--config.data.batch_size=8')
KEYS = ('step_time_s', 'flops_per_step', 'model_flops_per_step', 'mfu', 'compile_s',
        'step_time_p10_s', 'step_time_p90_s', 'examples_per_s', 'flops_per_s_per_device',
        'peak_flops_per_device', 'input_wait_fraction', 'peak_memory_bytes')


def run_bench(tmp_path: pathlib.Path, config: str, *overrides: str) -> dict:
  """Runs the benchmark in a child process whose temporary files go to tmp_path/tmp."""
  scratch = tmp_path / 'tmp'
  scratch.mkdir()
  env = runner.child_env() | {'TMPDIR': str(scratch)}
  result = subprocess.run(
      [sys.executable, '-m', 'ssl_jax.bench', f'--config={config}', '--warmup_steps=1',
       '--steps=3', *overrides], cwd=runner.REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'MFU' in result.stdout and 'input wait' in result.stdout  # The table came first.
  assert list(scratch.iterdir()) == []  # The temporary workdir (tokens, grain state) is gone.
  return json.loads(result.stdout.strip().splitlines()[-1])


def check_results(results: dict, xla_over_analytic: tuple[float, float]) -> None:
  """Every number present, positive and finite; XLA's FLOPs near the analytic count."""
  for key in KEYS:
    assert isinstance(results[key], (int, float)) and math.isfinite(results[key]), key
    assert results[key] > 0 or key == 'input_wait_fraction', key
  assert 0 <= results['input_wait_fraction'] < 1
  assert results['step_time_p10_s'] <= results['step_time_s'] <= results['step_time_p90_s']
  assert results['steps'] == 3
  # The analytic count is matmuls only; XLA adds the elementwise work (norms,
  # softmax, GELU, AdamW's ~10 FLOPs per parameter), a larger share at width 32.
  low, high = xla_over_analytic
  assert low <= results['flops_per_step'] / results['model_flops_per_step'] <= high


def test_bench_of_a_tiny_mae(tmp_path):
  results = run_bench(tmp_path, 'configs/mae_vit.py:local', *MAE_TINY)
  assert results['method'] == 'mae' and results['batch_size'] == 32
  assert results['images_per_s'] == results['examples_per_s']
  check_results(results, (0.9, 1.6))


def test_bench_of_a_tiny_gpt(tmp_path):
  results = run_bench(tmp_path, 'configs/gpt.py:local', *GPT_TINY, '--top_ops=5')
  assert results['method'] == 'gpt'
  assert math.isclose(results['tokens_per_s'], 128 * results['examples_per_s'])
  check_results(results, (0.9, 1.6))
  # --top_ops: the traced step's five longest HLO ops, longest first, each with its
  # share of all traced op time, its shape and the jax operation it came from.
  ops = results['top_ops']
  assert len(ops) == 5
  times = [op['s_per_step'] for op in ops]
  assert times == sorted(times, reverse=True) and times[-1] > 0
  assert all(0 < op['share'] <= 1 for op in ops) and sum(op['share'] for op in ops) <= 1 + 1e-9
  assert all(op['shape_and_source'].startswith(('f32[', 's32[', 'u32[', 'pred[', '('))
             for op in ops), ops
  assert any('jit(train_step)' in op['shape_and_source'] for op in ops), ops
  # The same time by kind of op: every traced op counted once, so the shares sum to 1.
  kinds = results['top_op_kinds']
  assert math.isclose(sum(k['share'] for k in kinds), 1.0)
  assert kinds[0]['s_per_step'] >= times[0] and all(k['ops'] >= 1 for k in kinds)
  assert profiling.op_kind(ops[0]['op']) in {k['kind'] for k in kinds}
  # The timeline's busy time is a union: at most the span, at most all ops' summed time.
  timeline = results['top_ops_timeline']
  all_ops_s = ops[0]['s_per_step'] / ops[0]['share']
  assert 0 < timeline['busy_s_per_step'] <= min(timeline['span_s_per_step'], all_ops_s * 1.000001)
  assert math.isclose(timeline['busy_fraction'],
                      timeline['busy_s_per_step'] / timeline['span_s_per_step'])


def test_ops_are_summed_by_kind():
  seconds = collections.Counter({'ynn_fusion': 1.0, 'ynn_fusion.12': 2.0, 'dot.3': 4.0,
                                 'transpose_copy_fusion.1': 0.5, 'wrapped_is-finite.7': 0.25})
  assert profiling.op_kind('wrapped_is-finite.7') == 'wrapped_is-finite'
  assert profiling.times_by_kind(seconds) == [
      ('dot', 4.0, 1), ('ynn_fusion', 3.0, 2), ('transpose_copy_fusion', 0.5, 1),
      ('wrapped_is-finite', 0.25, 1)]


def test_busy_time_is_the_union_of_the_ops_intervals():
  # Thread 1: [0, 4) and [10, 12); thread 2: [3, 6), inside nothing else, and [7, 8).
  events = [{'ts': ts, 'dur': dur, 'tid': tid} for ts, dur, tid in
            [(0, 4, 1), (10, 2, 1), (3, 3, 2), (7, 1, 2), (1, 1, 2)]]
  busy, span = profiling.busy_and_span(events)
  assert math.isclose(busy, (6 + 1 + 2) * 1e-6) and math.isclose(span, 12e-6)
  assert profiling.busy_and_span([]) == (0.0, 0.0)


def test_top_ops_turns_off_cuda_graphs_unless_the_user_chose():
  assert profiling.flags_for_trace('') == '--xla_gpu_enable_command_buffer='
  assert (profiling.flags_for_trace('--xla_cpu_use_onednn=true')
          == '--xla_cpu_use_onednn=true --xla_gpu_enable_command_buffer=')
  chosen = '--xla_gpu_enable_command_buffer=FUSION,CUBLAS'
  assert profiling.flags_for_trace(chosen) == chosen


def test_bench_runs_the_accumulating_step(tmp_path):
  # The trainer's step with 2 micro-batches: XLA's cost analysis counts the lax.scan body
  # once, so its FLOPs are about half the analytic count of the whole batch.
  results = run_bench(tmp_path, 'configs/gpt.py:local', *GPT_TINY,
                      '--config.train.grad_accum_steps=2')
  assert results['grad_accum_steps'] == 2
  assert 0.4 <= results['flops_per_step'] / results['model_flops_per_step'] <= 0.8


def test_bench_refuses_an_unknown_config_key(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'ssl_jax.bench', '--config=configs/gpt.py:local',
       '--config.train.no_such_key=1'], cwd=runner.REPO, env=runner.child_env(),
      capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert 'unknown config key --config.train.no_such_key' in result.stderr


def test_a_run_logs_input_wait_and_flops_and_writes_a_profile(tmp_path):
  result = runner.run_main(tmp_path, *runner.TINY, '--config.train.steps=6',
                           '--config.train.profile_steps=2', '--config.train.checkpoint_every=100')
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'Profiler trace of steps 2-3 written' in result.stdout
  assert list((tmp_path / 'profile').rglob('*.xplane.pb'))
  assert list((tmp_path / 'profile').rglob('perfetto_trace.json.gz'))
  records = [r for r in runner.read_metrics(tmp_path) if 'loss' in r]
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6]
  for record in records:
    assert 0 <= record['input_wait'] < 1
    assert record['tflops_per_sec_per_device'] > 0  # MAE now has an analytic FLOPs count.
  assert 'input wait' in result.stdout and 'GFLOP/s/device' in result.stdout


def test_mae_analytic_flops_by_hand():
  config = ml_collections.ConfigDict(dict(
      data=dict(image_size=16, channels=1),
      model=dict(patch_size=4, mask_ratio=0.75, width=8, mlp_dim=16, depth=1,
                 decoder_width=4, decoder_mlp_dim=8, decoder_depth=1)))
  # 16 patches of 16 pixels, 1 + 4 visible tokens to the encoder, 1 + 16 to the decoder.
  embeddings = 6 * (16 * 16 * 8 + 5 * 8 * 4 + 17 * 4 * 16)
  encoder = 6 * (4 * 8 * 8 + 2 * 8 * 16) * 5 + 12 * 5 ** 2 * 8
  decoder = 6 * (4 * 4 * 4 + 2 * 4 * 8) * 17 + 12 * 17 ** 2 * 4
  assert flops.mae_train_flops(config) == embeddings + encoder + decoder == 64464
