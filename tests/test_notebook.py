"""notebooks/probe.ipynb runs end to end against a tiny MAE run, in a kernel on this Python."""

import json
import re
import sys

import nbclient
import nbformat
import pytest

from tests import runner

NOTEBOOK = runner.REPO / 'notebooks' / 'probe.ipynb'
KERNEL = 'ssl_jax_test'  # A kernelspec of our own, so no system-wide 'python3' can stand in.


def kernelspec_dir(tmp_path):
  """A Jupyter data dir holding one kernelspec that starts ipykernel on sys.executable."""
  root = tmp_path / 'jupyter'
  spec = root / 'kernels' / KERNEL
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'ssl_jax (tests)', 'language': 'python'}))
  return root


def outputs(cell) -> tuple[str, int]:
  """(the text a code cell printed, how many PNG images it showed)."""
  text, images = [], 0
  for output in cell.get('outputs', []):
    text.append(output.get('text', ''))
    data = output.get('data', {})
    text.append(data.get('text/plain', ''))
    images += 'image/png' in data
  return ''.join(text), images


@pytest.mark.slow  # 30 s end to end.
def test_probe_notebook_runs_on_a_tiny_mae_run(tmp_path, monkeypatch):
  workdir = tmp_path / 'mae'
  run = runner.run_main(workdir, *runner.TINY, '--config.train.steps=8')
  assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not cell.get('outputs') for cell in notebook.cells if cell.cell_type == 'code'), (
      'commit the notebook with its outputs cleared')
  notebook.cells.append(nbformat.v4.new_code_cell('import sys; print(sys.executable)'))
  monkeypatch.setenv('JUPYTER_PATH', str(kernelspec_dir(tmp_path)))  # Read by the spec lookup.
  env = runner.child_env()  # One CPU device, cheap compiles.
  env.pop('MPLBACKEND', None)  # The kernel's inline backend, which emits the PNGs.
  env['SSL_JAX_WORKDIR'] = str(workdir)
  client = nbclient.NotebookClient(
      notebook, kernel_name=KERNEL, timeout=300,
      resources={'metadata': {'path': str(NOTEBOOK.parent)}})  # Where Jupyter would run it.
  client.execute(env=env)  # Raises CellExecutionError, with the traceback, if a cell fails.

  printed = [outputs(cell) for cell in notebook.cells if cell.cell_type == 'code']
  text = ''.join(t for t, _ in printed)
  assert printed[-1][0].strip() == sys.executable  # The kernel ran on this interpreter.
  assert 'mae encoder from' in text
  numbers = dict(re.findall(r'(knn_top1|linear_top1): (\d\.\d{4})', text))
  assert set(numbers) == {'knn_top1', 'linear_top1'}, text
  # Digits have 10 classes: a probe of features that carry anything beats chance.
  assert 0.1 < float(numbers['knn_top1']) <= 1.0, numbers
  assert sum(n for _, n in printed) >= 2, 'expected the t-SNE and the reconstructions'
