"""Orbax checkpoints of the train state and data-iterator position, and encoder export.

`workdir/checkpoints/<step>/` holds two items: `state` (the sharded train
state) and `data` (the grain iterator state of every process), so a rerun of
the same command continues exactly where the last checkpoint left off.
`workdir/export/` holds the encoder alone plus the config that rebuilds it.
"""

import json
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from ssl_jax import methods, sharding
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


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: the Orbax restore target."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


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
      others = [s for s in self._manager.all_steps() if s != step]
      raise CheckpointError(
          f'Cannot restore checkpoint step {step} from {self.directory / str(step)}: '
          f'{type(e).__name__}: {e}\n'
          'Either the checkpoint is damaged, or the config no longer matches the one it '
          'was saved with (model shape, optimizer, batch size, number of processes). '
          f'Nothing was deleted. Other checkpoints here: {others or "none"}. To fall back '
          'to an older one, move this step directory out of the way; to start afresh, '
          'use a new --workdir.') from e
    return restored.state

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator,
           *, force: bool = False) -> bool:
    """Starts an async save of `state` and the iterator position at `step`."""
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


def load_encoder(directory: epath.PathLike, mesh: jax.sharding.Mesh | None = None
                 ) -> tuple[nnx.Module, methods.Method]:
  """Rebuilds an exported encoder with its weights; also returns its method.

  The encoder is sharded by the exported config's logical-axis rules over
  `mesh` (default: every device on the data axis, i.e. replicated weights).
  """
  directory = epath.Path(directory)
  if not (directory / 'encoder').exists():
    raise FileNotFoundError(
        f'{directory} holds no exported encoder (expected {directory}/encoder).')
  config = load_config(directory / 'config.json')
  method = methods.create(config)
  mesh = mesh or sharding.make_mesh(sharding.mesh_config())
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    abstract = nnx.eval_shape(lambda: method.build_encoder(nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    target = abstract_with_shardings(abstract_state,
                                     sharding.state_shardings(abstract_state, mesh))
    checkpointer = ocp.StandardCheckpointer()
    state = checkpointer.restore(directory / 'encoder', target)
    checkpointer.close()
  logging.info('Loaded %s encoder from %s', config.method, directory)
  return nnx.merge(graphdef, state), method
