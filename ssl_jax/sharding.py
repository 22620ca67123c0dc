"""Device mesh, logical-axis rules and batch placement, single- and multi-host.

Parameters are annotated with logical axis names (`embed`, `mlp`, ...); the
rules in `config.mesh.rules` map each name to mesh axes (`data`, `fsdp`,
`tensor`), MaxText style. The batch is split over `data` and `fsdp`
together, so `fsdp` is ZeRO-3: parameters and optimizer state are sharded
over it, and it contributes to data parallelism.

Convolution kernels are split over `tensor` (output channels) only, not over
`fsdp`: with input channels on `fsdp` and output channels on `tensor`, jax
0.10.2 on CPU computed wrong kernel gradients on a (2, 2, 2) mesh (loss and
forward pass right), so `conv_in` stays unsharded. ResNets are small enough.
"""

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ssl_jax.config_blocks import BATCH_AXES, DEFAULT_RULES, MESH_AXES, mesh_config  # noqa: F401
from ssl_jax.errors import ConfigError


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh; one axis may be -1 to take the rest."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(mesh_cfg[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError('config.mesh: at most one axis may be -1, got '
                      f'{dict(zip(MESH_AXES, sizes, strict=True))}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError(
          f'config.mesh: {len(devices)} devices cannot be split into '
          f'{dict(zip(MESH_AXES, sizes, strict=True))}.')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ConfigError(
        f'config.mesh: axis sizes {dict(zip(MESH_AXES, sizes, strict=True))} multiply to '
        f'{int(np.prod(sizes))}, but there are {len(devices)} devices. Set one axis to -1.')
  # Auto axes: Explicit axes (jax.make_mesh's default) break NNX forward passes.
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_rules(mesh_cfg: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The config's logical-axis rules as a tuple of (name, mesh axes) pairs."""
  rules = []
  for name, axes in mesh_cfg.rules:
    axes = tuple(axes) if isinstance(axes, list) else axes
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(f'config.mesh.rules: {name!r} -> unknown mesh axis {axis!r}; '
                         f'axes are {MESH_AXES}')
    rules.append((name, axes))
  return tuple(rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Makes `mesh` and the logical rules current (needed to build annotated models)."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


_barriers = itertools.count()


def barrier(name: str, timeout_s: int = 1800) -> None:
  """Waits until every process gets here, through jax.distributed's coordination service.

  A no-op in one process. Call it before a collective that may set up a new
  Gloo context (a CPU all-gather over the processes): Gloo gives its peers
  only 30 s to arrive, which a busy machine's compile skew can exceed
  (`GetKeyValue() timed out with key: cpu:gloo/...`); this wait has
  `timeout_s`. Every process must call it in the same order.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  # No public handle.
  distributed.global_state.client.wait_at_barrier(f'ssl_jax:{name}:{next(_barriers)}',
                                                  timeout_in_ms=timeout_s * 1000)


def replicated(mesh: Mesh) -> NamedSharding:
  """Fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over the batch axes.

  Each process passes only its own rows; the global batch is the
  concatenation over processes (`jax.make_array_from_process_local_data`),
  so the same call works on one host and on many.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for an abstract nnx.State from its logical annotations."""
  specs = nnx.get_partition_spec(abstract_state)
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))
