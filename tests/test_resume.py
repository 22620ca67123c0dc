"""A run killed at any point and rerun ends exactly where an uninterrupted run ends."""

import json
import pathlib
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
import pytest
from etils import epath

from ssl_jax import checkpoint, train
from tests import hand_written_forms, runner

STEPS = ('--config.train.steps=40', '--config.train.checkpoint_every=10')


def start(workdir) -> subprocess.Popen:
  return subprocess.Popen(runner.main_command(workdir, *runner.TINY, *STEPS), cwd=runner.REPO,
                          env=runner.child_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def wait_for_step(process: subprocess.Popen, workdir, step: int, timeout=300) -> int:
  """Polls metrics.jsonl until `step` is logged; returns the last logged step."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    logged = [r['step'] for r in runner.read_metrics(workdir) if 'loss' in r]
    if logged and logged[-1] >= step:
      return logged[-1]
    assert process.poll() is None, f'run ended early:\n{process.stdout.read()}'
    time.sleep(0.02)
  raise TimeoutError(f'step {step} not reached')


def checkpoint_steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').iterdir()
                if p.name.isdigit())


def test_kill_and_sigterm_then_resume_equals_uninterrupted(tmp_path):
  straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
  done = runner.run_main(straight, *runner.TINY, *STEPS)
  assert done.returncode == 0, done.stdout + done.stderr

  # 1. SIGKILL between checkpoints: everything after step 20's checkpoint is lost.
  process = start(interrupted)
  killed_after = wait_for_step(process, interrupted, 23)
  process.kill()
  process.wait()
  saved = checkpoint_steps(interrupted)
  assert max(saved) < killed_after, (saved, killed_after)  # Killed between checkpoints.

  # 2. Rerun; this time SIGTERM, which saves a checkpoint at the current step.
  process = start(interrupted)
  stopped_after = wait_for_step(process, interrupted, 33)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 0, output
  assert 'Stopped by signal' in output and 'Resumed from' in output
  stop_step = max(checkpoint_steps(interrupted))
  assert stop_step >= stopped_after and stop_step % 10, (stop_step, stopped_after)

  # 3. Rerun to the end.
  finished = runner.run_main(interrupted, *runner.TINY, *STEPS)
  assert finished.returncode == 0, finished.stdout + finished.stderr
  assert f'Resumed from {interrupted / "checkpoints" / str(stop_step)}' in finished.stdout

  # Same parameters, optimizer state and data position as the uninterrupted run...
  # ... and the same loss at every step, each step logged once.
  runner.assert_same_run(straight, interrupted, 40)
  assert [s for s, _ in runner.logged_losses(straight)] == list(range(1, 41))


def test_rerun_of_finished_run_skips_training_and_corrupt_checkpoints_are_reported(tmp_path):
  first = runner.run_main(tmp_path, *runner.TINY, '--config.train.steps=6',
                          '--config.train.checkpoint_every=2')
  assert first.returncode == 0, first.stdout + first.stderr
  # The same command again: nothing left to train, so it only re-runs the final phase.
  again = runner.run_main(tmp_path, *runner.TINY, '--config.train.steps=6',
                          '--config.train.checkpoint_every=2')
  assert again.returncode == 0, again.stdout + again.stderr
  assert 'Resumed from' in again.stdout and 'Compiling the train step' not in again.stdout
  assert [r['step'] for r in runner.read_metrics(tmp_path) if 'loss' in r] == [1, 2, 3, 4, 5, 6]
  # Now corrupt every checkpoint's arrays (as a changed config would fail them all): a clear
  # error, and not a byte changes.
  assert checkpoint_steps(tmp_path) == [2, 4, 6]
  for f in (tmp_path / 'checkpoints').glob('*/state/**/*'):
    if f.is_file() and f.stat().st_size > 1000:  # Array data files.
      f.write_bytes(b'garbage' * 10)
  before = file_contents(tmp_path)
  broken = runner.run_main(tmp_path, *runner.TINY, '--config.train.steps=8',
                           '--config.train.checkpoint_every=2')
  assert broken.returncode != 0
  assert 'Cannot restore checkpoint step 6' in broken.stderr, broken.stderr
  assert 'No older checkpoint restores either (steps [4, 2])' in broken.stderr
  assert 'Nothing was deleted or moved' in broken.stderr and 'Traceback' not in broken.stderr
  assert file_contents(tmp_path) == before  # Not a byte changed, config.json included.


@pytest.mark.slow  # 40 s: two runs and a resume.
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
  straight, damaged = tmp_path / 'straight', tmp_path / 'damaged'
  args = (*runner.TINY, '--config.train.steps=8', '--config.train.checkpoint_every=2')
  done = runner.run_main(straight, *args)
  assert done.returncode == 0, done.stdout + done.stderr
  shutil.copytree(straight, damaged)
  # Half-written: every array file of the newest checkpoint cut to half its length.
  for f in (damaged / 'checkpoints' / '8' / 'state').rglob('*'):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  resumed = runner.run_main(damaged, *args)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert 'Cannot restore checkpoint step 8' in resumed.stdout, resumed.stdout
  aside = damaged / 'checkpoints' / '8.unreadable'
  assert f'Falling back to step 6; step 8 set aside as {aside} (nothing deleted)' in resumed.stdout
  assert f'Resumed from {damaged / "checkpoints" / "6"} at step 6' in resumed.stdout
  assert aside.is_dir() and checkpoint_steps(damaged) == [4, 6, 8]  # 8 saved afresh.
  runner.assert_same_run(straight, damaged, 8)


def file_contents(directory) -> dict:
  return {p.relative_to(directory): p.read_bytes() for p in directory.rglob('*') if p.is_file()}


def test_latest_saved_step_is_the_checkpoint_managers(tmp_path):
  """orbax's step lookup against the former directory scan and CheckpointManager.latest_step."""
  for workdir in (tmp_path / 'nowhere', tmp_path / 'empty'):
    (tmp_path / 'empty' / 'checkpoints').mkdir(parents=True, exist_ok=True)
    assert checkpoint.latest_saved_step(workdir) is None
    assert hand_written_forms.latest_saved_step(workdir) is None
  directory = tmp_path / 'run' / 'checkpoints'
  manager = ocp.CheckpointManager(directory, item_names=('state',))
  for step in (3, 12):
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({'x': jnp.ones(2)})))
  manager.wait_until_finished()
  manager.close()
  (directory / '40.orbax-checkpoint-tmp-99').mkdir()  # A save cut short.
  (directory / 'notes').mkdir()
  assert checkpoint.latest_saved_step(tmp_path / 'run') == 12
  assert hand_written_forms.latest_saved_step(tmp_path / 'run') == 12
  assert ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True)).latest_step() == 12


def test_only_process_0_reads_or_writes_config_json(tmp_path, monkeypatch, capsys):
  """Another process once read config.json while process 0 rewrote it, found it empty and
  died; now only process 0 touches it, and replaces it whole."""
  config = ml_collections.ConfigDict({'a': 1, 'b': {'c': 2}})
  saved = tmp_path / 'config.json'
  saved.write_text('')  # What that reader saw mid-rewrite.
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  train.write_config(config, epath.Path(tmp_path))
  assert saved.read_text() == ''
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  saved.write_text(json.dumps({'a': 1, 'b': {'c': 3}}))
  train.write_config(config, epath.Path(tmp_path))
  assert json.loads(saved.read_text()) == {'a': 1, 'b': {'c': 2}}
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']
  assert 'config keys changed since the last run: b.c' in capsys.readouterr().out
