r"""Command line entry point: flags, config, jax.distributed, then `train`.

  python -m ssl_jax.main --config=configs/mae_vit.py[:VARIANT] --workdir=DIR \
      [--config.KEY=VALUE ...]

Rerunning the same command on the same DIR resumes from the newest checkpoint.
Multi-process (several hosts, or processes on one host): pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I to each, or
--distributed to let `jax.distributed.initialize()` read a TPU pod / SLURM
environment; the scripts in launch/ do either (README, "Launching on many hosts").
--dry_run compiles the train step on abstract inputs and prints whether it
fits (`ssl_jax.dry_run`; README, "Big models and dry runs").
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from ssl_jax import cli, host_memory
from ssl_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with a variant: configs/mae_vit.py:local.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory (local or gs://) for checkpoints, logs and exports.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Call jax.distributed.initialize() with auto-detection '
    '(TPU pods, SLURM, Open MPI).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, for explicit multi-process runs.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Build the abstract train state, its shardings and the compiled train '
    'step, print parameters and per-device memory (last line: JSON), then exit: no data is '
    'read, no parameter allocated, nothing written to --workdir.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with unknown `--config.` keys reported by their full name."""
  return cli.parse_config_flags(
      argv, 'python -m ssl_jax.main --config=configs/X.py[:VARIANT] --workdir=DIR '
      '[--config.KEY=VALUE ...]')


def start_distributed() -> bool:
  """Calls `jax.distributed.initialize` as the flags ask; returns whether it did.

  Explicit (--coordinator_address, --num_processes, --process_id): processes on
  one machine or hosts without a cluster manager (launch/local.sh). Auto
  (--distributed): jax reads the environment, a TPU pod slice's metadata or
  SLURM's SLURM_* variables (jax/_src/clusters/slurm_cluster.py:20-25), and
  picks the coordinator, process count and index (launch/tpu_pod.sh,
  launch/slurm.sbatch).
  """
  import jax  # After flag parsing, so a bad flag costs no jax start-up.
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      sys.exit('error: --coordinator_address needs --num_processes and --process_id.')
    jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
    return True
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
    return True
  return False


def main(argv: list[str]) -> None:
  """Starts jax.distributed if asked, trains, then leaves jax.distributed together."""
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  cli.quiet_logging()
  host_memory.keep_freed_memory()  # Before jax starts its backend.
  distributed = start_distributed()
  from ssl_jax import dry_run, train
  try:
    if _DRY_RUN.value:
      dry_run.report(dry_run.dry_run(_CONFIG.value))
    else:
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:  # A message for the user, not a traceback.
    sys.exit(f'error: {e}')
  if distributed:
    # A barrier: process 0 hosts the coordination service, and exiting before
    # the others finish (their last checkpoint, export) would cut them off
    # (jax/_src/distributed.py:192-203, 344). Only on success: after an
    # error the others may never arrive, and the launcher stops them.
    import jax
    jax.distributed.shutdown()


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
