"""Runs launch/ scripts from tests: a coordinator port held for them, every output kept."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

from tests import runner

LAUNCH_TIMEOUT_S = 600  # Far above the ~35 s one tiny launch takes; only a hang reaches it.


@contextlib.contextmanager
def reserved_port():
  """A localhost port nobody else can take until the block ends, which the coordinator can bind.

  A port from bind(0) that is closed before the coordinator binds it can be
  taken meanwhile by any other process on the machine (other tests run here
  at the same time); jax's own multi-process harness notes the same race
  (jax/_src/test_multiprocess.py:252-258). Here the port stays bound, with
  SO_REUSEPORT and never listening, while the job runs: the kernel gives it
  to no other bind(), yet the coordinator's gRPC server, which sets
  SO_REUSEPORT too, binds it (a port taken without SO_REUSEPORT fails at once
  with 'Failed to start RPC server', not a hang).
  """
  with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(('127.0.0.1', 0))
    yield s.getsockname()[1]


def local_launch(workdir, *flags, config='configs/mae_vit.py:local', processes=2,
                 devices=4, on_started=None, timeout=LAUNCH_TIMEOUT_S) -> list[str]:
  """Runs launch/local.sh to the end; returns each process's output; fails showing all of it.

  `on_started(log_dir)` runs while the job does (a test of signals). A launch
  that outlives `timeout` seconds is killed, process group and all, and
  reported with its output so far.
  """
  log_dir = workdir / f'logs-{time.monotonic_ns()}'
  log_dir.mkdir(parents=True)
  argv = runner.main_command(workdir, *flags, config=config)[3:]  # After `python -m ssl_jax.main`.
  with reserved_port() as port:
    env = {**runner.child_env(devices=devices), 'PORT': str(port), 'LOG_DIR': str(log_dir),
           'PYTHON': sys.executable}
    launcher = subprocess.Popen(['bash', 'launch/local.sh', str(processes), *argv], cwd=runner.REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
      if on_started:
        on_started(log_dir)
      launcher_output = launcher.communicate(timeout=timeout)[0]
    except BaseException as e:  # A hang (TimeoutExpired), a failed on_started, Ctrl-C.
      os.killpg(launcher.pid, signal.SIGKILL)  # The processes too: they share its group.
      launcher_output = launcher.communicate()[0] + f'\n[killed by the test: {e!r}]'
      launcher.returncode = launcher.returncode or -9
  outputs = [(log_dir / f'process_{i}.log').read_text() if (log_dir / f'process_{i}.log').exists()
             else '(no log)' for i in range(processes)]
  report = '\n'.join([f'===== launch/local.sh (exit {launcher.returncode})', launcher_output] +
                     [f'===== process {i}\n{out}' for i, out in enumerate(outputs)])
  (log_dir / 'report.txt').write_text(report)
  assert launcher.returncode == 0, f'{log_dir / "report.txt"}:\n{report}'
  return outputs


def wait_for_line(path, text: str, timeout: float = 300) -> None:
  """Polls the file at `path` until it holds `text`."""
  deadline = time.monotonic() + timeout
  while not (path.exists() and text in path.read_text()):
    if time.monotonic() > deadline:
      raise TimeoutError(f'{text!r} not in {path} after {timeout} s')
    time.sleep(0.05)
