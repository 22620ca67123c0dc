"""metrics.jsonl writing, truncation on resume, and the progress line."""

import json

import pytest

from ssl_jax import metrics


def lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize('remote', [False, True], ids=['local', 'object-store'])
def test_write_and_truncate(tmp_path, remote):
  writer = metrics.MetricWriter(tmp_path)
  writer._remote = remote  # Object-store mode: whole-file rewrites instead of appends.
  for step in (1, 2, 3):
    writer.write_scalars(step, {'loss': 1.0 / step})
  writer.close()
  assert [r['step'] for r in lines(tmp_path / 'metrics.jsonl')] == [1, 2, 3]

  resumed = metrics.MetricWriter(tmp_path)
  resumed._remote = remote
  resumed._remote_text = (tmp_path / 'metrics.jsonl').read_text() if remote else ''
  resumed.truncate(2)
  resumed.write_scalars(3, {'loss': 0.5})
  resumed.close()
  assert lines(tmp_path / 'metrics.jsonl') == [
      {'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 0.5}, {'step': 3, 'loss': 0.5}]
  assert list(tmp_path.glob('events.out.tfevents.*'))


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics.MetricWriter(tmp_path, enabled=False)
  writer.write_scalars(1, {'loss': 1.0})
  writer.truncate(0)
  writer.close()
  assert list(tmp_path.iterdir()) == []


def test_progress_line(monkeypatch):
  clock = iter([0.0, 10.0, 20.0])
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
  progress = metrics.Progress(total_steps=1000, start_step=0, unit='images', units_per_step=128)
  scalars = {'loss': 0.5, 'lr': 1e-3, **progress.rates(1)}
  assert progress.line(1, scalars) == (
      'step 1/1000 | loss 0.5000 | lr 0.001 | compiled and ran in 10.0 s')
  progress.waited_for_input(0.5)  # 0.5 s of the window's 10 s spent getting batches.
  progress.waited_for_input(0.25)
  scalars = {'loss': 0.25, 'lr': 2e-3, **progress.rates(101)}
  assert scalars['steps_per_sec'] == 10.0 and scalars['images_per_sec'] == 1280.0
  assert scalars['input_wait'] == 0.075
  assert progress.line(101, scalars) == (
      'step 101/1000 | loss 0.2500 | lr 0.002 | 10.00 steps/s | 1280 images/s | '
      'input wait 7.5% | ETA 0:01:30')


def test_progress_reports_model_flops_and_mfu(monkeypatch):
  clock = iter([0.0, 1.0, 2.0])
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock))
  # 2 devices of a known kind: 10 steps/s x 1e14 FLOPs/step / 2 devices = 5e14 FLOP/s each.
  progress = metrics.Progress(total_steps=100, start_step=0, unit='tokens', units_per_step=4096,
                              flops_per_step=1e14, num_devices=2,
                              device_kind='NVIDIA H100 80GB HBM3')
  progress.line(10, {'loss': 1.0, 'lr': 1e-4, **progress.rates(10)})  # The compile line.
  scalars = {'loss': 1.0, 'lr': 1e-4, **progress.rates(20)}
  assert scalars['tflops_per_sec_per_device'] == 500.0
  assert scalars['mfu'] == 5e14 / 989e12
  assert 'MFU 50.6%' in progress.line(20, scalars)
  # A device kind with no known peak (a CPU) shows the achieved rate instead.
  clock2 = iter([0.0, 1.0, 2.0])
  monkeypatch.setattr(metrics.time, 'perf_counter', lambda: next(clock2))
  cpu = metrics.Progress(total_steps=100, start_step=0, unit='tokens', units_per_step=1,
                         flops_per_step=1e9, num_devices=1, device_kind='cpu')
  cpu.line(1, {'loss': 1.0, 'lr': 1e-4, **cpu.rates(1)})
  scalars = {'loss': 1.0, 'lr': 1e-4, **cpu.rates(3)}
  assert 'mfu' not in scalars
  assert '2.0 GFLOP/s/device' in cpu.line(3, scalars)
