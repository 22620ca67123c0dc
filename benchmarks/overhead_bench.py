r"""Framework overhead: the trainer's jitted step and loop against a bare jitted step (issue 15).

Run from the repository root, in the project's venv:

  python -m benchmarks.overhead_bench --config configs/gpt.py:local [--rounds 5] [--steps 20]
      [--loop_steps 60] [--config.KEY=VALUE ...]

Three ways of taking the same optimizer steps of the same model and loss on
one batch already on the device (input is not timed here: see
`python -m ssl_jax.bench` for input wait):

  bare     value_and_grad of `method.loss_fn`, `tx.update`, `optax.apply_updates`,
           in one `jax.jit` with the state donated: what a hand-written script does;
  step     `train_step.make_train_step`, the trainer's jitted step: the bare step
           plus the non-finite guard (the isfinite reductions and the `where` that
           keeps a skipped step's state), `method.after_step` and the logged
           norms, with shardings on the mesh;
  loop     the step as `train.train_loop` drives it (`--loop_steps`, once, after
           the rounds): step time from `metrics.jsonl`'s `steps_per_sec` of a
           short `python -m ssl_jax.main` run, so it includes the host's work
           per step (input, metrics windows, progress, checkpoint agreement).

`bare` and `step` are compiled apart, then timed in alternation for
`--rounds` rounds of `--steps` steps each (this machine drifts up to 2x
between runs); the table gives the median step time over rounds, its spread,
and each one's overhead over `bare`. Last stdout line: JSON.
"""

import json
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from ssl_jax import host_memory, sharding, train
from ssl_jax.train_step import make_train_step

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file[:variant].')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Alternating rounds.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Steps per round and side.')
EVALS = ('knn', 'linear_probe', 'online_probe', 'held_out', 'pictures')
_LOOP_STEPS = flags.DEFINE_integer('loop_steps', 60, 'Steps of the trainer run (0: skip).')


def bare_step(method, graphdef, tx):
  """The hand-written step: loss, gradients, update; no guard, no norms, no shardings."""
  def step(params, model_state, opt_state, batch, rng, count):
    def loss_of(params):
      model = nnx.merge(graphdef, params, model_state, copy=True)
      loss, _ = method.loss_fn(model, batch, rng, count)
      return loss, nnx.state(model, nnx.Not(nnx.Param))
    (loss, model_state), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), model_state, opt_state, loss, count + 1
  return jax.jit(step, donate_argnums=(0, 1, 2))


def config_name() -> str:
  """The --config argument as given (file[:variant])."""
  return flags.FLAGS['config'].config_filename


def timed(run, steps: int) -> float:
  """Median seconds of one of `steps` calls of `run` (each waited for)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jitted_sides(config, workdir: str) -> dict[str, list[float]]:
  """Median step times per round of the bare and the trainer's jitted steps."""
  config, method, mesh, train_data, schedule, tx = train.setup(config, workdir)
  rng = jax.random.key(1)
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, config.seed)
    batch = sharding.put_batch(next(iter(train_data.dataset)), mesh)
    ours = make_train_step(method, graphdef, tx, schedule, shardings, mesh,
                           grad_accum_steps=config.train.grad_accum_steps)
    bare = bare_step(method, graphdef, tx)
    state = {'ours': train.init_train_state(method, tx, shardings, config.seed)}
    fresh = train.init_train_state(method, tx, shardings, config.seed)
    state['bare'] = (fresh['params'], fresh['model_state'], fresh['opt_state'], None,
                     fresh['step'])

    def run_ours():
      state['ours'], metrics = ours(state['ours'], batch, rng)
      return metrics['loss']

    def run_bare():
      params, model_state, opt_state, _, count = state['bare']
      state['bare'] = bare(params, model_state, opt_state, batch, rng, count)
      return state['bare'][3]

    sides = {'bare': run_bare, 'step': run_ours}
    for run in sides.values():  # Compile and warm up, untimed.
      for _ in range(3):
        jax.block_until_ready(run())
    result = {name: [] for name in sides}
    for round_index in range(_ROUNDS.value):
      order = list(sides) if round_index % 2 == 0 else list(sides)[::-1]
      for name in order:
        result[name].append(timed(sides[name], _STEPS.value))
  return result


def loop_step_time(argv_overrides: list[str]) -> float | None:
  """Median step time of the trainer's loop, from a short run's metrics.jsonl."""
  if not _LOOP_STEPS.value:
    return None
  with tempfile.TemporaryDirectory() as workdir:
    log_every = max(_LOOP_STEPS.value // 6, 1)
    command = [sys.executable, '-m', 'ssl_jax.main', f'--config={config_name()}',
               f'--workdir={workdir}', *argv_overrides,
               f'--config.train.steps={_LOOP_STEPS.value}', f'--config.train.log_every={log_every}',
               '--config.train.checkpoint_every=1000000', '--config.train.eval_every=1000000',
               '--config.optim.warmup_steps=1',
               *[f'--config.eval.{name}.enabled=False' for name in EVALS]]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise SystemExit(f'{" ".join(command)} failed:\n{result.stdout}{result.stderr}')
    with open(f'{workdir}/metrics.jsonl') as f:
      rows = [json.loads(line) for line in f]
  rates = [r['steps_per_sec'] for r in rows if 'steps_per_sec' in r][1:]  # First holds compile.
  return 1 / statistics.median(rates) if rates else None


def main(argv):
  del argv
  host_memory.keep_freed_memory()  # As the entry points do, before jax starts its backend.
  overrides = [a for a in sys.argv[1:] if a.startswith('--config.')]
  with tempfile.TemporaryDirectory() as workdir:
    rounds = jitted_sides(_CONFIG.value, workdir)
  medians = {name: statistics.median(times) for name, times in rounds.items()}
  loop = loop_step_time(overrides)
  print(f'{config_name()}: median step time over {_ROUNDS.value} rounds of '
        f'{_STEPS.value} steps (one batch on the device)')
  print(f'{"side":8s} {"ms (min-max over rounds)":>28s} {"over bare":>10s}')
  for name, times in rounds.items():
    print(f'{name:8s} {1e3 * medians[name]:12.2f} ({1e3 * min(times):.2f}-{1e3 * max(times):.2f})'
          f' {100 * (medians[name] / medians["bare"] - 1):+9.1f}%')
  if loop is not None:
    print(f'{"loop":8s} {1e3 * loop:12.2f} {"(one run)":>15s} '
          f'{100 * (loop / medians["bare"] - 1):+9.1f}%')
  print(json.dumps({'config': config_name(), 'rounds': rounds,
                    'bare_s': medians['bare'], 'step_s': medians['step'], 'loop_s': loop,
                    'step_overhead': medians['step'] / medians['bare'] - 1,
                    'loop_overhead': None if loop is None else loop / medians['bare'] - 1}))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
