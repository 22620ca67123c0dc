"""The cluster launchers of launch/, run here with stand-ins for `srun` and `gcloud`.

launch/slurm.sbatch runs for real (plain bash reads #SBATCH lines as
comments) with a fake `srun` that starts its tasks on this machine with the
SLURM_* variables a real one sets, so `--distributed` goes through jax's
SLURM detection end to end. launch/tpu_pod.sh needs a TPU slice's metadata
server: the fake `gcloud` only records the command it would run on every
worker, which is checked for what it runs and that it parses.
"""

import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from tests import runner
from tests.launching import reserved_port

FAKE_SRUN = r'''#!/usr/bin/env bash
# Starts --ntasks-per-node tasks here, each with the variables SLURM gives a task.
set -euo pipefail
tasks=1
while [[ "$1" == -* ]]; do
  case "$1" in --ntasks-per-node=*) tasks="${1#*=}" ;; esac
  shift
done
pids=()
for ((i = 0; i < tasks; i++)); do
  SLURM_JOB_ID=4242 SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1 \
    SLURM_NTASKS="${tasks}" SLURM_PROCID="${i}" SLURM_LOCALID="${i}" \
    "$@" >"${SRUN_LOG_DIR}/task_${i}.log" 2>&1 &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do wait "${pid}" || status=$?; done
exit "${status}"
'''

FAKE_GCLOUD = r'''#!/usr/bin/env bash
# Records each call: its arguments on one line of GCLOUD_LOG, its --command in .commands.
words=()
for arg in "$@"; do
  case "${arg}" in
    --command=*) printf '%s\n' "${arg#--command=}" >>"${GCLOUD_LOG}.commands" ;;
    *) words+=("${arg}") ;;
  esac
done
printf '%s\n' "${words[*]}" >>"${GCLOUD_LOG}"
'''


def fake_bin(tmp_path, name: str, text: str) -> pathlib.Path:
  directory = tmp_path / 'bin'
  directory.mkdir(exist_ok=True)
  (directory / name).write_text(text)
  (directory / name).chmod(0o755)
  return directory


@pytest.mark.slow  # ~40-60 s on 2 loaded cores; local.sh's tests cover the trainer's side.
def test_slurm_sbatch_one_process_per_gpu_detects_slurm(tmp_path):
  bin_dir = fake_bin(tmp_path, 'srun', FAKE_SRUN)
  workdir = tmp_path / 'run'
  with reserved_port() as port:
    env = {**runner.child_env(devices=1), 'PATH': f'{bin_dir}:{os.environ["PATH"]}',
           'SRUN_LOG_DIR': str(tmp_path), 'JAX_COORDINATOR_PORT': str(port),
           'PROCESS_PER': 'gpu', 'GPUS_PER_NODE': '2', 'VENV': sys.prefix}
    argv = runner.main_command(workdir, *runner.TINY, '--config.train.steps=2',
                                '--config.optim.warmup_steps=1',
                                '--config.eval.linear_probe.enabled=False')[3:]
    result = subprocess.run(['bash', 'launch/slurm.sbatch', *argv], cwd=runner.REPO, env=env,
                            capture_output=True, text=True, timeout=600)
  logs = [(tmp_path / f'task_{i}.log').read_text() for i in range(2)]
  report = result.stdout + result.stderr + ''.join(
      f'\n===== task {i}\n{log}' for i, log in enumerate(logs))
  assert result.returncode == 0, report
  # Two processes found each other through SLURM_* alone: one batch split in two.
  assert 'batch 32 = 16 x 2 process(es)' in logs[0] and 'step 2/2' in logs[0], report
  assert 'step ' not in logs[1], report
  assert runner.logged_losses(workdir)[-1][0] == 2


def test_tpu_pod_runs_the_same_quoted_command_on_every_worker(tmp_path):
  bin_dir = fake_bin(tmp_path, 'gcloud', FAKE_GCLOUD)
  log = tmp_path / 'gcloud.log'
  env = {**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'GCLOUD_LOG': str(log),
         'REPO_URL': 'https://example.com/ssl_jax.git'}
  flags = ['--config=configs/mae_vit.py', '--workdir=gs://bucket/mae',
           '--config.data.crop_scale=(0.2, 1.0)']
  for action, extra in (('setup', []), ('train', flags), ('stop', [])):
    subprocess.run(['bash', 'launch/tpu_pod.sh', action, 'my-tpu', 'us-central2-b', *extra],
                   cwd=runner.REPO, env=env, check=True, timeout=60)
  calls = log.read_text().splitlines()
  assert len(calls) == 3 and all('tpu-vm ssh my-tpu --zone=us-central2-b' in c for c in calls)
  assert all('--worker=all' in c for c in calls)
  commands = (tmp_path / 'gcloud.log.commands').read_text()
  subprocess.run(['bash', '-n', '-c', commands], check=True)  # What each worker runs parses.
  assert 'git clone https://example.com/ssl_jax.git' in commands
  assert 'jax\\[tpu\\]==' in commands
  train_line = next(line for line in commands.splitlines() if 'ssl_jax.main' in line)
  words = shlex.split(train_line.split('nohup ', 1)[1].split(' >', 1)[0])
  assert words == ['python', '-m', 'ssl_jax.main', '--distributed', *flags]
