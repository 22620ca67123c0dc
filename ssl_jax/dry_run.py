"""`python -m ssl_jax.main ... --dry_run`: will this config fit, before renting the machines?

Builds what `ssl_jax.train` builds, abstractly: the train state through
`jax.eval_shape` (no parameter is allocated), its shardings from the mesh
and the logical-axis rules, and the real jitted train step
(`ssl_jax.train_step.make_train_step`) lowered and compiled for a batch of
`jax.ShapeDtypeStruct`s shaped as the method's data would be. No data is
read (ImageNet or C4 need not be on the machine) and nothing is written:
a text method's vocabulary is `model.vocab_size`, else `data.vocab_size`
(the size the tokenizer would be trained to), not a tokenizer's.

The memory figures are XLA's own for the compiled, partitioned step on one
device (`Compiled.memory_analysis()`): arguments (the state's shard and the
batch's), outputs (the new state, aliased onto the donated arguments) and
temporaries (activations kept for the backward pass, gradients, optimizer
update). On GPU and TPU these are what the allocator is asked for; XLA:CPU
reports the same buffer assignment, though a CPU run never allocates it as
one block, so a CPU dry run is an estimate of the accelerator's need (its
fusions, and so its temporaries, differ somewhat).
"""

import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ssl_jax import checkpoint, methods, sharding, step_bench, train
from ssl_jax.data.streams import DataSpec
from ssl_jax.metrics import log_line
from ssl_jax.train_step import check_grad_accum, make_train_step

GIB = 2**30


def abstract_batch(config: ml_collections.ConfigDict, spec: DataSpec,
                   mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the data pipeline would give, as ShapeDtypeStructs sharded on `mesh`.

  Images: uint8 (B, H, W, C) `image` or one uint8 (B, count, size, size, C)
  entry per view spec, and int32 `label` (ssl_jax/data/pipeline.py
  `train_dataset`). Text: the windows of ssl_jax/data/text.py
  (`causal_example`, `masked_example`), each (B, T).
  """
  batch_size, data = config.data.batch_size, config.data
  shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
  if spec.kind == 'images':
    if spec.views is None:
      shapes['image'] = ((data.image_size, data.image_size, data.channels), jnp.uint8)
    for view in spec.views or ():
      shapes[view.name] = ((view.count, view.size, view.size, data.channels), jnp.uint8)
    shapes['label'] = ((), jnp.int32)
  elif spec.objective == 'causal_lm':
    shapes = {'tokens': ((data.seq_len,), jnp.int32), 'weights': ((data.seq_len,), jnp.float32)}
  else:
    shapes = {name: ((data.seq_len,), dtype) for name, dtype in (
        ('inputs', jnp.int32), ('labels', jnp.int32), ('weights', jnp.float32),
        ('token_types', jnp.int32), ('key_mask', jnp.bool_))}
  placed = sharding.batch_sharding(mesh)
  return {name: jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=placed)
          for name, (shape, dtype) in shapes.items()}


def dry_config(config: ml_collections.ConfigDict, spec: DataSpec) -> ml_collections.ConfigDict:
  """`config` resolved without data: one step an epoch, the vocabulary from the config."""
  updates = {}
  if spec.kind == 'text' and config.model.get('vocab_size') is None:
    updates['model.vocab_size'] = config.data.vocab_size
  return train.resolve_config(config, config.data.batch_size, updates)


def memory_figures(compiled: Any) -> dict[str, int]:
  """Per-device bytes of a compiled step: arguments, outputs, temporaries, code, and the total.

  Outputs aliased onto donated arguments (the new train state) are counted
  once: total = arguments + outputs - aliased + temporaries + generated code.
  """
  stats = compiled.memory_analysis()
  figures = {
      'argument_bytes': int(stats.argument_size_in_bytes),
      'output_bytes': int(stats.output_size_in_bytes),
      'alias_bytes': int(stats.alias_size_in_bytes),
      'temp_bytes': int(stats.temp_size_in_bytes),
      'generated_code_bytes': int(stats.generated_code_size_in_bytes),
  }
  figures['bytes_per_device'] = (figures['argument_bytes'] + figures['output_bytes']
                                 - figures['alias_bytes'] + figures['temp_bytes']
                                 + figures['generated_code_bytes'])
  return figures


def step_flops(compiled: Any, grad_accum_steps: int) -> float | None:
  """FLOPs of one step of one device's program, by XLA's cost analysis (None if not reported).

  XLA counts a `lax.scan` body once (`step_bench.xla_flops`), so with k
  micro-batches the count is one micro-batch's; it is scaled by k here (the
  optimizer update, outside the scan, is then counted k times: a small excess).
  """
  flops = step_bench.xla_flops(compiled)
  return None if flops is None else flops * grad_accum_steps / jax.device_count()


def compiler_options() -> dict[str, str]:
  """XLA options of the dry run's compile: on CPU, the memory-optimised scheduler.

  XLA:CPU's default scheduler orders for speed and keeps a rematerialised
  block's recomputation as live as the saved activations: with it, remat
  'full' and 'none' gave the same temporaries (ViT-H, 4 blocks, 64 images a
  device: 3.94 and 3.89 GiB). With CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED they
  are 2.45 and 3.04 GiB. GPU and TPU compilers schedule with memory limits,
  so this is the closer estimate of what they allocate.
  """
  if jax.devices()[0].platform != 'cpu':
    return {}
  return {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


def dry_run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Abstract state, shardings and the compiled train step of `config`; returns the figures."""
  method_class = methods.method_class(config)
  mesh = sharding.make_mesh(config.mesh)
  check_grad_accum(config, method_class, mesh)
  spec = method_class.data_spec(config)
  config = dry_config(config, spec)
  method = method_class(config)
  schedule, tx = train.build_optimizer(config)
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, config.seed)
    state = checkpoint.abstract_with_shardings(jax.eval_shape(
        lambda: train.init_train_state(method, tx, shardings, config.seed)), shardings)
    step = make_train_step(method, graphdef, tx, schedule, shardings, mesh,
                           grad_accum_steps=config.train.grad_accum_steps)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    start = time.perf_counter()
    lowered = step.lower(state, abstract_batch(config, spec, mesh), rng)
    compiled = lowered.compile(compiler_options=compiler_options())
    compile_s = time.perf_counter() - start
  return {
      'method': config.method,
      'params': sum(x.size for x in jax.tree.leaves(state['params'])),
      'param_bytes': _bytes(state['params']),
      'optimizer_state_bytes': _bytes(state['opt_state']),
      'model_state_bytes': _bytes(state['model_state']),
      'mesh': {axis: int(size) for axis, size in mesh.shape.items()},
      'devices': jax.device_count(),
      'platform': jax.devices()[0].platform,
      'global_batch': config.data.batch_size,
      'dtype': str(config.model.get('dtype')),
      'remat': config.model.get('remat'),
      **memory_figures(compiled),
      'flops_per_step_per_device': step_flops(compiled, config.train.grad_accum_steps),
      'grad_accum_steps': config.train.grad_accum_steps,
      'compile_s': round(compile_s, 1),
  }


def _bytes(tree: Any) -> int:
  """Global bytes of the arrays of an abstract tree (all shards together)."""
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def report(figures: dict[str, Any]) -> None:
  """Prints the figures for a person, then one JSON line (the last on stdout) for scripts."""
  log_line(f'dry run of {figures["method"]}: mesh {figures["mesh"]} over {figures["devices"]} '
           f'{figures["platform"]} devices, global batch {figures["global_batch"]}, '
           f'compute {figures["dtype"]}, remat {figures["remat"]}')
  log_line(f'  parameters: {figures["params"]:,} ({figures["param_bytes"] / GIB:.2f} GiB '
           f'float32); optimizer state {figures["optimizer_state_bytes"] / GIB:.2f} GiB; '
           f'other model state {figures["model_state_bytes"] / GIB:.2f} GiB (all devices)')
  log_line('  per device (XLA memory_analysis of the compiled step): '
           + ', '.join(f'{key[:-6]} {figures[key] / GIB:.2f} GiB' for key in (
               'argument_bytes', 'output_bytes', 'alias_bytes', 'temp_bytes',
               'generated_code_bytes'))
           + f'; total {figures["bytes_per_device"] / GIB:.2f} GiB')
  flops = figures['flops_per_step_per_device']
  log_line(f'  step FLOPs per device (XLA cost_analysis, x {figures["grad_accum_steps"]} '
           'micro-batches): '
           f'{"not reported" if flops is None else f"{flops:.3e}"}; '
           f'compiled in {figures["compile_s"]} s')
  print(json.dumps(figures), flush=True)
