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


def run_json(command: list[str], env: dict[str, str] | None = None) -> dict:
  """Runs `command`; its last stdout line parsed as JSON.

  On a non-zero exit the process's output goes to stderr and the result is
  {'error': its last output line}, so a driver can report the failure and go on.
  """
  done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    output = (done.stdout + done.stderr).strip()
    sys.stderr.write(output + '\n')
    last = output.splitlines()[-1] if output else ''
    return {'error': f'exit {done.returncode}: {" ".join(command)}: {last}'}
  return json.loads(done.stdout.strip().splitlines()[-1])
