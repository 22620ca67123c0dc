"""Running a benchmark in its own process and reading the JSON object it prints last.

`ssl_jax.bench`, benchmarks/torch_peers.py and the other benchmarks print
their results as a JSON object on their last stdout line; the drivers that
compare them side by side (speed_side_by_side.py, xla_flags_sweep.py) run
each one in a fresh process, so that no run inherits another's compiled
code, threads or allocator state.
"""

import json
import subprocess
import sys


def run_json(command: list[str], env: dict[str, str] | None = None,
             timeout: float | None = None, log: str | None = None) -> dict:
  """Runs `command`; its last stdout line parsed as JSON.

  On a non-zero exit the process's output goes to stderr and the result is
  {'error': its last output line}, so a driver can report the failure and go on;
  likewise a process still running after `timeout` seconds is killed and reported.
  `log`: a file that receives the command and its whole output.
  """
  try:
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False,
                          timeout=timeout)
  except subprocess.TimeoutExpired as e:
    output = '\n'.join(part if isinstance(part, str) else (part or b'').decode(errors='replace')
                       for part in (e.stdout, e.stderr))
    sys.stderr.write(output + '\n')
    _write_log(log, command, output)
    return {'error': f'timed out after {timeout:.0f} s: {" ".join(command)}'}
  _write_log(log, command, done.stdout + done.stderr)
  if done.returncode != 0:
    output = (done.stdout + done.stderr).strip()
    sys.stderr.write(output + '\n')
    last = output.splitlines()[-1] if output else ''
    return {'error': f'exit {done.returncode}: {" ".join(command)}: {last}'}
  return json.loads(done.stdout.strip().splitlines()[-1])


def _write_log(log: str | None, command: list[str], output: str) -> None:
  """Writes `command` and its `output` to the file `log`, if one is given."""
  if log:
    with open(log, 'w') as f:
      f.write(' '.join(command) + '\n' + output)
