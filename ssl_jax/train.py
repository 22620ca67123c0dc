"""The one training loop every method runs on.

Phases, each a named function below: setup (config, mesh, data, method),
init (the train state is born sharded), restore (train state and data
position from the newest checkpoint), the loop (one jitted, donated step,
built in `ssl_jax.train_step`, which also skips non-finite steps),
evaluations at their cadence (`ssl_jax.eval`) and the end (final
checkpoint, evaluations, encoder export). Nothing here names a method or a
metric: everything method-specific is behind `ssl_jax.methods.base.Method`,
everything about evaluations behind `ssl_jax.eval.evaluator.Evaluator`.
The method is built once, from the config resolved with what the data
decides (`ssl_jax.data.streams`).

The train state is a plain dict: `step`, `params` (nnx.Param variables),
`model_state` (every other variable: BatchNorm statistics, EMA teachers,
centers) and `opt_state`.
"""

import copy
import dataclasses
import json
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from ssl_jax import checkpoint, methods, optim, sharding
from ssl_jax.data import streams
from ssl_jax.data.device_prefetch import DevicePrefetch
from ssl_jax.errors import ConfigError
from ssl_jax.eval import registry
from ssl_jax.eval.evaluator import Evaluator
from ssl_jax.methods.base import Method
from ssl_jax.metrics import MetricWriter, Progress, log_line
from ssl_jax.profiling import StepProfiler
from ssl_jax.train_step import NonFiniteGuard, check_grad_accum, make_train_step, window_scalars

TrainState = dict[str, Any]


# ------------------------------------------------------------------------------
# Setup.
# ------------------------------------------------------------------------------
def resolve_config(config: ml_collections.ConfigDict, num_train_examples: int,
                   data_updates: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Fills in what depends on the data: steps from epochs, warmup, peak lr.

  `train.steps`, when set, wins over `train.epochs` (and `optim.warmup_steps`
  over `optim.warmup_epochs`). `data_updates` (dotted key -> value) are the
  values the data decides (`TrainData.config_updates`). The result is what
  `config.json` records.
  """
  config = copy.deepcopy(config)
  batch_size = config.data.batch_size
  steps_per_epoch = max(num_train_examples // batch_size, 1)
  with config.unlocked():
    config.update_from_flattened_dict(data_updates or {})
    config.train.steps_per_epoch = steps_per_epoch
    if config.train.steps is None:
      if config.train.epochs is None:
        raise ConfigError('Set config.train.steps or config.train.epochs.')
      config.train.steps = max(round(config.train.epochs * steps_per_epoch), 1)
    if config.optim.warmup_steps is None:
      epochs = config.optim.warmup_epochs or 0.0
      config.optim.warmup_steps = round(epochs * steps_per_epoch)
    config.optim.peak_lr = optim.peak_learning_rate(config.optim, batch_size)
  return config


def write_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  """Process 0 writes config.json; on resume it says which keys differ from the saved one.

  The others neither read nor write it: a process reading while process 0
  rewrote it once read an empty file and died (JSONDecodeError) in a
  two-process resume. The write goes to a temporary file renamed over the
  old one, so that no reader (a probe, a second launch) sees it half written.
  """
  if jax.process_index() != 0:
    return
  path = workdir / 'config.json'
  new = json.loads(config.to_json_best_effort())
  if path.exists():
    old = json.loads(path.read_text())
    changed = sorted(_flat_diff(old, new))
    if changed:
      log_line(f'Note: resuming with config keys changed since the last run: {", ".join(changed)}')
  temporary = workdir / 'config.json.tmp'
  temporary.write_text(json.dumps(new, indent=2) + '\n')
  temporary.replace(path)


def _flat_diff(old: Any, new: Any, prefix: str = '') -> set[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    keys = set(old) | set(new)
    return set().union(*(_flat_diff(old.get(k), new.get(k), f'{prefix}{k}.') for k in keys))
  return set() if old == new else {prefix.rstrip('.')}


def build_optimizer(config: ml_collections.ConfigDict):
  """(schedule, optax transformation) of a resolved config."""
  schedule = optim.learning_rate_schedule(config.optim, config.optim.peak_lr, config.train.steps)
  return schedule, optim.build_optimizer(config.optim, schedule)


# ------------------------------------------------------------------------------
# Init: the train state is created directly with its final shardings.
# ------------------------------------------------------------------------------
def state_shardings_and_graphdef(method: Method, tx: optax.GradientTransformation,
                                 mesh: jax.sharding.Mesh, seed: int):
  """Abstract train state, its shardings and the model's graphdef (no arrays made)."""
  abstract_model = nnx.eval_shape(lambda: method.build(nnx.Rngs(seed)))
  graphdef, params, model_state = nnx.split(abstract_model, nnx.Param, ...)
  param_shardings = sharding.state_shardings(params, mesh)
  # jit(tx.init) alone would replicate mu/nu; give them their parameter's sharding.
  # A masked transformation (optax.partition) holds MaskedNode for the other group's leaves.
  opt_shardings = optax.tree_map_params(
      tx, lambda p, s: p if isinstance(p, optax.MaskedNode) else s,
      jax.eval_shape(tx.init, params), param_shardings,
      transform_non_params=lambda _: sharding.replicated(mesh),
      is_leaf=lambda v: isinstance(v, optax.MaskedNode))
  shardings = {'step': sharding.replicated(mesh), 'params': param_shardings,
               'model_state': sharding.state_shardings(model_state, mesh),
               'opt_state': opt_shardings}
  return graphdef, shardings


def init_train_state(method: Method, tx: optax.GradientTransformation, shardings: Any,
                     seed: int) -> TrainState:
  """Builds model and optimizer state inside jit, born with `shardings`."""
  def init() -> TrainState:
    _, params, model_state = nnx.split(method.build(nnx.Rngs(seed)), nnx.Param, ...)
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'model_state': model_state, 'opt_state': tx.init(params)}
  return jax.jit(init, out_shardings=shardings)()


# ------------------------------------------------------------------------------
# Stopping early on SIGTERM (preemption) with a checkpoint.
# ------------------------------------------------------------------------------
class StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks, so it can save and exit.

  With `sigterm=False` SIGTERM is left to whoever holds it: under
  jax.distributed, jax's preemption notifier, which the loop hears through
  `Checkpointer.reached_preemption` (see `checkpoint.jax_catches_sigterm`).
  """

  def __init__(self, sigterm: bool = True):
    self.requested = False
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT) if sigterm else (signal.SIGINT,):
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.requested:  # A second signal: give up at once.
      signal.signal(signum, self._previous[signum])
      signal.raise_signal(signum)
    self.requested = True

  def agreed(self, step: int, every: int) -> bool:
    """True if any process was asked to stop (all processes must stop together).

    With several processes this is a collective, a sync point, so they only
    compare flags every `every` steps; a single process checks every step.
    """
    if jax.process_count() == 1:
      return self.requested
    if step % every:
      return False
    return bool(multihost_utils.process_allgather(np.array(self.requested)).any())

  def restore(self) -> None:
    """Puts the previous signal handlers back."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


# ------------------------------------------------------------------------------
# The whole job.
# ------------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
  """Everything the loop and the final phase share, built once in setup."""
  config: ml_collections.ConfigDict
  method: Method
  mesh: jax.sharding.Mesh
  workdir: epath.Path
  checkpointer: checkpoint.Checkpointer
  data_iter: Any
  train_step: Any
  evaluator: Evaluator
  writer: MetricWriter
  rng: jax.Array


def setup(config: ml_collections.ConfigDict, workdir: epath.Path | str):
  """Mesh, train data, resolved config, method and optimizer: what a run and a benchmark share.

  The data decides the epoch length (and a tokenizer's vocabulary), which the
  resolved config, and so the method built once from it, depends on; an
  accumulation that cannot fit is refused before any data is read.
  Returns (config, method, mesh, train_data, schedule, tx).
  """
  method_class = methods.method_class(config)
  mesh = sharding.make_mesh(config.mesh)
  check_grad_accum(config, method_class, mesh)
  train_data = streams.train_data(config, method_class.data_spec(config), workdir)
  config = resolve_config(config, train_data.num_examples, train_data.config_updates)
  schedule, tx = build_optimizer(config)
  return config, method_class(config), mesh, train_data, schedule, tx


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) `config` in `workdir`; returns the final eval metrics."""
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  registry.check(config, methods.method_class(config))  # An impossible eval fails first.
  config, method, mesh, train_data, schedule, tx = setup(config, workdir)
  rules = sharding.logical_rules(config.mesh)
  log_line(f'{config.method}: {config.train.steps} steps of batch {config.data.batch_size} '
           f'({config.train.steps_per_epoch} steps/epoch over {train_data.num_examples} '
           f'examples of {config.data.source}); peak lr {config.optim.peak_lr:.3g}; mesh '
           f'{dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices')
  log_line('data: ' + train_data.description)

  with sharding.activate(mesh, rules):
    graphdef, shardings = state_shardings_and_graphdef(method, tx, mesh, config.seed)
    checkpointer = checkpoint.Checkpointer(workdir / 'checkpoints',
                                           keep=config.train.keep_checkpoints)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    job = Job(config=config, method=method, mesh=mesh, workdir=workdir,
              checkpointer=checkpointer,
              data_iter=DevicePrefetch(iter(train_data.dataset), mesh),
              train_step=make_train_step(method, graphdef, tx, schedule, shardings, mesh,
                                         grad_accum_steps=config.train.grad_accum_steps),
              evaluator=Evaluator(config, method, graphdef, mesh, writer, workdir),
              writer=writer,
              rng=jax.random.fold_in(jax.random.key(config.seed), 1))  # Init used Rngs(seed).
    try:
      state = restore_or_init(job, tx, shardings)
      num_params = sum(x.size for x in jax.tree.leaves(state['params']))
      log_line(f'model: {num_params / 1e6:.2f}M trainable parameters')
      write_config(config, workdir)  # Only now: a failed restore must change no file.
      state, batch, stopped = train_loop(job, state)
      return {} if stopped else finish(job, state, batch)
    finally:
      job.data_iter.close()
      checkpointer.close()
      writer.close()


def restore_or_init(job: Job, tx: optax.GradientTransformation, shardings: Any) -> TrainState:
  """The newest checkpoint if there is one (data position too), else a fresh state.

  A fresh state takes its weights from `train.init_from` when that is set
  (e.g. BERT's 512-token phase starts from the 128-token run).
  """
  config, checkpointer = job.config, job.checkpointer
  latest = checkpointer.latest_step()
  if latest is None:
    log_line(f'No checkpoint in {checkpointer.directory}: starting from step 0.')
    job.writer.truncate(0)
    state = init_train_state(job.method, tx, shardings, config.seed)
    if config.train.get('init_from'):
      state = initialised_from(job, state, config.train.init_from)
    return state
  abstract = jax.eval_shape(lambda: init_train_state(job.method, tx, shardings, config.seed))
  target = checkpoint.abstract_with_shardings(abstract, shardings)
  # A damaged newest checkpoint is set aside and the one before it restored.
  state, step = checkpointer.restore_newest(target, job.data_iter, log_line)
  job.writer.truncate(step)  # Later lines are work the resumed run redoes.
  log_line(f'Resumed from {checkpointer.directory / str(step)} at step {step}.')
  return state


def initialised_from(job: Job, state: TrainState, source: str) -> TrainState:
  """`state` with the weights of another run's workdir or export (see checkpoint.load_weights).

  Step, optimizer state and data position stay fresh: this starts a new run.
  """
  model = job.evaluator.model(state)
  loaded = checkpoint.load_weights(source, model, job.method.encoder(model))
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  log_line(f'Initialised the weights from {loaded} (train.init_from).')
  return {**state, 'params': params, 'model_state': model_state}


def train_loop(job: Job, state: TrainState) -> tuple[TrainState, Any, bool]:
  """Steps until `train.steps`; returns (state, last batch, stopped by a signal).

  Raises DivergedError after `train.max_nonfinite_steps` consecutive skipped
  (non-finite) steps, before any further checkpoint is saved.
  """
  config, total = job.config, job.config.train.steps
  step = int(state['step'])
  flops = job.method.train_flops_per_example()
  progress = Progress(total, step, job.method.throughput_unit,
                      job.method.examples_to_units(config.data.batch_size),
                      flops_per_step=None if flops is None else flops * config.data.batch_size,
                      num_devices=jax.device_count(), device_kind=jax.devices()[0].device_kind)
  stop = StopSignal(sigterm=not checkpoint.jax_catches_sigterm())
  guard = NonFiniteGuard(config.train.max_nonfinite_steps)
  pending, batch, first_step = [], None, step + 1
  profiler = StepProfiler(job.workdir / 'profile', first_step, config.train.get('profile_steps'))
  if step < total:
    log_line(f'Compiling the train step (step {step})...')
  try:
    while step < total:
      profiler.before(step + 1)
      fetch_start = time.perf_counter()
      batch = next(job.data_iter)  # Already on the mesh (data/device_prefetch.py).
      progress.waited_for_input(time.perf_counter() - fetch_start)
      state, metrics = job.train_step(state, batch, job.rng)
      pending.append(metrics)
      step += 1
      profiler.after(step, state)
      guard.watch(step, metrics)
      if step % config.train.log_every == 0 or step == total or step == first_step:
        guard.flush()
        scalars = window_scalars(pending) | progress.rates(step)
        pending = []
        log_line(progress.line(step, scalars))
        for warning in job.method.check_metrics(scalars):
          log_line(f'WARNING at step {step}: {warning}')
        job.writer.write_scalars(step, scalars)
      if job.evaluator.due(step):
        results = job.evaluator(state, batch, job.rng)
        if results:
          log_line(f'eval at step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in results.items()))
          job.writer.write_scalars(step, results)
      if step % config.train.checkpoint_every == 0 and step < total:
        guard.flush()  # A run that has just hit its limit stops without saving.
        job.checkpointer.save(step, state, job.data_iter)
      # Orbax's preemption sync point is the same step on every process (no collective).
      if stop.agreed(step, every=config.train.log_every) or job.checkpointer.reached_preemption(
          step):
        guard.flush()
        job.checkpointer.save(step, state, job.data_iter, force=True)
        log_line(f'Stopped by signal at step {step}; checkpoint saved. '
                 'Rerun the same command to resume.')
        return state, batch, True
    guard.flush()
  finally:
    stop.restore()
    profiler.close()
  return state, batch, False


def finish(job: Job, state: TrainState, batch: Any) -> dict[str, float]:
  """Final checkpoint, final evals (with the random-init baseline) and encoder export."""
  config, evaluator = job.config, job.evaluator
  step = int(state['step'])
  job.checkpointer.save(step, state, job.data_iter)  # No-op if this step is already saved.
  if batch is None:  # Resumed a finished run: draw a batch for the pictures.
    batch = next(job.data_iter)
  results = evaluator.final(state, batch, job.rng)
  job.writer.write_scalars(step, results)
  for line in evaluator.summary(results):
    log_line(line)
  export_dir = checkpoint.export_encoder(job.workdir / 'export', evaluator.encoder(state), config)
  tokenizer = job.workdir / 'tokenizer.json'  # A text run's: the export reads text on its own.
  if tokenizer.exists() and jax.process_index() == 0:
    (export_dir / 'tokenizer.json').write_text(tokenizer.read_text())
  log_line(f'Encoder exported to {export_dir}')
  logging.info('Final results: %s', results)
  return results
