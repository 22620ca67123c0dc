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
  scalars = {'loss': 0.25, 'lr': 2e-3, **progress.rates(101)}
  assert scalars['steps_per_sec'] == 10.0 and scalars['images_per_sec'] == 1280.0
  assert progress.line(101, scalars) == (
      'step 101/1000 | loss 0.2500 | lr 0.002 | 10.00 steps/s | 1280 images/s | ETA 0:01:30')
