"""Orbax checkpoints of the train state and data-iterator position, and encoder export.

`workdir/checkpoints/<step>/` holds two items: `state` (the sharded train
state) and `data` (the grain iterator state of every process), so a rerun of
the same command continues exactly where the last checkpoint left off.
`workdir/export/` holds the encoder alone plus the config that rebuilds it.
"""

import json
from collections.abc import Callable
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from ssl_jax.errors import CheckpointError


def _use_plain_array_writer_on_cpu() -> None:
  """On CPU, saves arrays without Orbax's replica-parallel writer.

  That writer compiles a slice program per shape and device on the first
  save (5-7 s on CPU, for nothing: CPU replicas share one memory); the plain
  writer saves the same bytes (../shared/STACK-probe-notes.md, section 4).
  Accelerators keep the default. Called after jax.distributed is set up.
  """
  if jax.default_backend() != 'cpu':
    return
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # Orbax warns about every handler override.
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
  finally:
    logging.set_verbosity(verbosity)


def jax_catches_sigterm() -> bool:
  """Whether jax's preemption notifier, not Python, owns SIGTERM in this process.

  `jax.distributed.initialize` starts a preemption sync manager whose C++
  notifier installs a SIGTERM handler (jax/_src/distributed.py:205-219, on by
  default: `jax_enable_preemption_service`, distributed.py:47). A Python
  `signal.signal(SIGTERM, ...)` afterwards would replace it and
  `Checkpointer.reached_preemption` would never fire; the trainer leaves
  SIGTERM to jax when this is True.
  """
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: the Orbax restore target."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _restored_everywhere(restored: bool) -> bool:
  """Whether every process restored the step: a step one process cannot read is no one's."""
  if jax.process_count() == 1:
    return restored
  return bool(multihost_utils.process_allgather(np.array(restored)).all())


class Checkpointer:
  """Saves and restores {train state, data iterator} under `workdir/checkpoints`."""

  def __init__(self, directory: epath.PathLike, *, keep: int):
    _use_plain_array_writer_on_cpu()
    self.directory = epath.Path(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_names=('state', 'data'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            # A run killed mid-save leaves `<step>.orbax-checkpoint-tmp`; it
            # is never a valid checkpoint, so clear it when we start again.
            cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator) -> Any:
    """Restores step `step` into `abstract_state`'s shardings; rewinds `data_iterator`."""
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as e:  # Orbax raises many types; all mean the same to a user.
      raise CheckpointError(
          f'Cannot restore checkpoint step {step} from {self.directory / str(step)}: '
          f'{type(e).__name__}: {e}\n'
          'Either the checkpoint is damaged, or the config no longer matches the one it '
          'was saved with (model shape, optimizer, batch size, number of processes).') from e
    return restored.state

  def restore_newest(self, abstract_state: Any, data_iterator: grain.DatasetIterator,
                     log: Callable[[str], None]) -> tuple[Any, int]:
    """(state, step) of the newest checkpoint that restores; newer unreadable ones set aside.

    A damaged or half-written newest checkpoint (a file truncated or missing
    inside `<step>/`) is renamed `<step>.unreadable`, kept, never deleted, and the
    one before it restored. Renamed, because Orbax refuses to save any step
    at or below its newest (`CheckpointManager.should_save`), so leaving it in
    place would skip every save until the run passed it, the final one included;
    and Orbax ignores that name (its standard step format reads integer names
    only), so it neither restores nor rotates it out (max_to_keep).
    If no checkpoint restores, the config most likely no longer matches the
    run that saved them (a shape differs): that stays an error (the newest's),
    and nothing is renamed. Call it before training, on every process.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        state, error = self.restore(step, abstract_state, data_iterator), None
      except CheckpointError as e:
        state, error = None, e
      if not _restored_everywhere(error is None):
        failures.append(error or CheckpointError(
            f'Cannot restore checkpoint step {step}: another process could not read it.'))
        continue
      for failure, bad in zip(failures, steps, strict=False):
        log(f'{str(failure).splitlines()[0][:400]}\nFalling back to step {step}; step {bad} '
            f'set aside as {self._set_aside(bad)} (nothing deleted).')
      return state, step
    if not failures:
      raise CheckpointError(f'No checkpoint in {self.directory}.')
    raise CheckpointError(
        f'{failures[0]}\nNo older checkpoint restores either (steps {steps[1:] or "none"}), '
        'so the config most likely changed. Nothing was deleted or moved. To start '
        'afresh, use a new --workdir.') from failures[0].__cause__

  def _set_aside(self, step: int) -> epath.Path:
    """Renames `<step>/` to an unused `<step>.unreadable[-n]` (process 0); returns the new path."""
    target, n = self.directory / f'{step}.unreadable', 1
    while target.exists():
      n += 1
      target = self.directory / f'{step}.unreadable-{n}'
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'checkpoint set aside {step}')
    self._manager.reload()
    return target

  def reached_preemption(self, step: int) -> bool:
    """True at the step where every process must save because one was told it will be preempted.

    Orbax asks jax's preemption sync manager (CheckpointManager.reached_preemption,
    orbax/checkpoint/checkpoint_manager.py:1209 -> _src/multihost/multihost.py:444 ->
    jax/experimental/multihost_utils.py:187 `reached_preemption_sync_point`). Once
    `jax.distributed.initialize` has run, its C++ notifier holds SIGTERM; the first
    process that gets one tells the coordination service, which picks the step
    after the largest any process has reached, and this returns True at that same
    step on every process: no collective of ours. Every process must call it at
    every step. Without jax.distributed (or with `jax_enable_preemption_service`
    off) it is always False (multihost.py:451-458).
    """
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator,
           *, force: bool = False) -> bool:
    """Starts an async save of `state` and the iterator position at `step`.

    A step already saved is left as it is, even with `force`: a stop (signal or
    preemption) can fall on a `checkpoint_every` step, and Orbax raises
    StepAlreadyExistsError for a second save of one step
    (orbax/checkpoint/checkpoint_manager.py:1475).
    """
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


# ------------------------------------------------------------------------------
# Encoder export for downstream probing.
# ------------------------------------------------------------------------------
def export_encoder(directory: epath.PathLike, encoder: nnx.Module,
                   config: ml_collections.ConfigDict) -> epath.Path:
  """Saves the encoder's variables and the resolved config under `directory`."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  _use_plain_array_writer_on_cpu()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / 'encoder', nnx.state(encoder), force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    (directory / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return directory


def load_config(path: epath.PathLike) -> ml_collections.ConfigDict:
  """Reads a `config.json` written by the trainer or by `export_encoder`."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'No config.json at {path}.')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


# ------------------------------------------------------------------------------
# Weights of another run: `train.init_from`, the sampler.
# ------------------------------------------------------------------------------
def latest_saved_step(workdir: epath.PathLike) -> int | None:
  """The newest complete checkpoint step in `workdir/checkpoints`, or None.

  Found as `Checkpointer`'s CheckpointManager finds it, with its default step
  naming: a plain `<step>` directory is complete; `<step>.orbax-checkpoint-tmp-*`
  (a save cut short) is not. Without a manager, so nothing is created or cleaned.
  """
  latest = ocp.path.step.latest_step_metadata(
      epath.Path(workdir) / 'checkpoints', ocp.path.step.standard_name_format())
  return None if latest is None else latest.step


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings, when known) of a tree of arrays or structs."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
      tree)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'blocks/0/attn/qkv/kernel': shape} of a tree of arrays or Orbax array metadata."""
  def name(path) -> str:
    keys = [str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path]
    return '/'.join(k for k in keys if k != 'value')  # nnx.Variable's leaf is `.value`.
  return {name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_same_shapes(saved: Any, target: Any, source: epath.Path) -> None:
  """CheckpointError listing what differs between saved weights and the model's."""
  saved, target = _shapes(saved), _shapes(target)
  problems = [f'{k}: saved {saved[k]}, this model {target[k]}'
              for k in sorted(saved.keys() & target.keys()) if saved[k] != target[k]]
  problems += [f'{k}: not in {source}' for k in sorted(target.keys() - saved.keys())]
  if problems:
    raise CheckpointError(
        f'The weights in {source} do not fit this model ({len(problems)} mismatches): '
        + '; '.join(problems[:5]) + ('; ...' if len(problems) > 5 else '')
        + '. The model config (sizes, vocabulary) must match the run that saved them.')


def restore_params(workdir: epath.PathLike, params: Any,
                   model_state: Any = None) -> tuple[Any, Any, int]:
  """(params, model_state, step) of the newest train-state checkpoint in `workdir`.

  `params` (arrays or ShapeDtypeStructs) gives the tree, shapes and
  shardings; so does `model_state` (BatchNorm statistics, EMA teachers),
  which is read only when it has leaves (else it comes back as given). The optimizer state
  on disk is not read.
  """
  step = latest_saved_step(workdir)
  if step is None:
    raise CheckpointError(f'No checkpoint in {epath.Path(workdir) / "checkpoints"}.')
  path = epath.Path(workdir) / 'checkpoints' / str(step) / 'state'
  wanted = {'params': params}
  if jax.tree.leaves(model_state):  # A model without other variables saves none.
    wanted['model_state'] = model_state
  checkpointer = ocp.PyTreeCheckpointer()
  verbosity = logging.get_verbosity()
  # Read alone, the item makes Orbax warn that the step's metadata file (one level up) is missing.
  logging.set_verbosity(logging.ERROR)
  try:
    saved = checkpointer.metadata(path).item_metadata
    for key, tree in wanted.items():
      if key not in saved:
        raise CheckpointError(f'{path} holds no {key} (keys {sorted(saved.keys())}).')
      _check_same_shapes(saved[key], tree, path)
    target = {key: _abstract(tree) for key, tree in wanted.items()}
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True))
  finally:
    logging.set_verbosity(verbosity)
    checkpointer.close()
  return restored['params'], restored.get('model_state', model_state), step


def restore_export(directory: epath.PathLike, state: Any) -> Any:
  """The variables exported under `directory/encoder`, shaped and sharded like `state`."""
  path = epath.Path(directory) / 'encoder'
  checkpointer = ocp.StandardCheckpointer()
  try:
    _check_same_shapes(checkpointer.metadata(path).item_metadata, state, path)
    return checkpointer.restore(path, _abstract(state))
  finally:
    checkpointer.close()


def load_weights(source: epath.PathLike, model: nnx.Module, encoder: nnx.Module) -> str:
  """Overwrites weights in place from another run; returns what was loaded, for the log.

  `source` is a workdir (every variable of its newest checkpoint goes into
  the whole `model`: parameters, BatchNorm statistics, DINO's teacher and
  center) or an export directory (its variables go into `encoder`, the part
  of `model` that the method exports; every other variable keeps its value).
  """
  source = epath.Path(source)
  if (source / 'checkpoints').is_dir():
    _, params, model_state = nnx.split(model, nnx.Param, ...)
    params, model_state, step = restore_params(source, params, model_state)
    nnx.update(model, params, model_state)
    return f'checkpoint {source / "checkpoints" / str(step)}'
  if (source / 'encoder').is_dir():
    nnx.update(encoder, restore_export(source, nnx.state(encoder)))
    return f'the exported encoder in {source / "encoder"}'
  raise CheckpointError(f'{source} is neither a workdir (with checkpoints/) nor an export '
                        '(with encoder/): nothing to initialise from.')
