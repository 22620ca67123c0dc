"""Times the trainer's own train step: what `python -m ssl_jax.bench` measures.

The step is built exactly as `ssl_jax.train.train_and_evaluate` builds it
(the same data stream, resolved config, optimizer, shardings, initial state
and `make_train_step`); only the loop differs: it is compiled ahead of time
(`lower(...).compile()`), so compilation is timed apart and XLA's cost and
memory analyses of that very executable can be read, and every step is
waited for, so each one has its own time. The host's time in
`next(data_iter)` and `put_batch` is counted as input wait. The trainer's
loop overlaps that work with the device's previous step (asynchronous
dispatch), so the input wait here is an upper bound of the trainer's.
"""

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssl_jax import sharding, train
from ssl_jax.metrics import PEAK_FLOPS
from ssl_jax.train_step import make_train_step


@dataclasses.dataclass
class StepTimes:
  """What one benchmark measured; `summary` turns it into the reported numbers."""
  config: ml_collections.ConfigDict
  compile_s: float
  step_s: np.ndarray      # (steps,) wall time of each measured step, input included.
  input_s: np.ndarray     # (steps,) of which waiting for the batch (next + put_batch).
  xla_flops: float | None          # XLA's cost analysis of the compiled step (all devices).
  model_flops: float | None        # The method's analytic count (6 N T + attention).
  units_per_step: int
  unit: str
  memory: dict[str, Any]
  loss: float             # After the last step: flags or layouts that change the numbers show.
  hlo_text: str | None = None  # The compiled step's HLO, when steps were traced.


def time_train_step(config: ml_collections.ConfigDict, workdir: str, *, warmup_steps: int,
                    steps: int, trace_steps: int = 0) -> StepTimes:
  """Builds the trainer's step for `config`, runs warmup + measured steps, times each one.

  `trace_steps` more steps, after the measured ones, run under `jax.profiler`
  with a Perfetto trace written under WORKDIR/trace (`profiling.hlo_op_times`).
  """
  config, method, mesh, train_data, schedule, tx = train.setup(config, workdir)
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  data_iter = iter(train_data.dataset)
  with sharding.activate(mesh, sharding.logical_rules(config.mesh)):
    graphdef, shardings = train.state_shardings_and_graphdef(method, tx, mesh, config.seed)
    state = train.init_train_state(method, tx, shardings, config.seed)
    jitted = make_train_step(method, graphdef, tx, schedule, shardings, mesh,
                             grad_accum_steps=config.train.grad_accum_steps)
    batch = sharding.put_batch(next(data_iter), mesh)
    start = time.perf_counter()
    compiled = jitted.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    step_s, input_s = [], []
    for _ in range(warmup_steps + steps):
      start = time.perf_counter()
      batch = sharding.put_batch(next(data_iter), mesh)
      fetched = time.perf_counter()
      state, metrics = compiled(state, batch, rng)
      jax.block_until_ready((state, metrics))
      step_s.append(time.perf_counter() - start)
      input_s.append(fetched - start)
    loss = float(metrics['loss'])  # After the measured steps, traced or not.
    if trace_steps:
      with jax.profiler.trace(f'{workdir}/trace', create_perfetto_trace=True):
        for _ in range(trace_steps):
          state, metrics = compiled(state, sharding.put_batch(next(data_iter), mesh), rng)
        jax.block_until_ready((state, metrics))
  if hasattr(data_iter, 'close'):
    data_iter.close()
  per_example = method.train_flops_per_example()
  return StepTimes(
      config=config, compile_s=compile_s, step_s=np.array(step_s[warmup_steps:]),
      input_s=np.array(input_s[warmup_steps:]), xla_flops=xla_flops(compiled),
      model_flops=None if per_example is None else per_example * config.data.batch_size,
      units_per_step=method.examples_to_units(config.data.batch_size),
      unit=method.throughput_unit, memory=memory_use(compiled), loss=loss,
      hlo_text=compiled.as_text() if trace_steps else None)


def xla_flops(compiled: Any) -> float | None:
  """FLOPs of one step by XLA's HloCostAnalysis of the compiled executable, over all devices.

  The analysis is of one device's (SPMD-partitioned) program, so it is
  multiplied by the device count. A `lax.scan` body is counted once, not once
  per iteration (checked: a 4-step scan of a matmul counts one matmul), so
  with `train.grad_accum_steps` k the count is about one micro-batch's. On a
  GPU it leaves out the library calls, cuBLAS matmuls and cuDNN attention:
  GPT-2 124M's step counted 186 GFLOPs of the analytic 56 TFLOPs on an H200.
  """
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per computation.
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops']) * jax.device_count()


def memory_use(compiled: Any) -> dict[str, Any]:
  """Peak device memory: the allocator's peak where the device reports it, else XLA's plan."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return {'peak_memory_bytes': int(stats['peak_bytes_in_use']),
            'peak_memory_source': 'device.memory_stats peak_bytes_in_use'}
  try:
    plan = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    plan = None
  if plan is None:
    return {'peak_memory_bytes': None, 'peak_memory_source': 'n/a'}
  # Arguments (the donated state, the batch) + outputs not aliased to them + temporaries.
  total = (plan.argument_size_in_bytes + plan.output_size_in_bytes
           - plan.alias_size_in_bytes + plan.temp_size_in_bytes)
  return {'peak_memory_bytes': int(total),
          'peak_memory_source': 'compiled.memory_analysis (arguments + outputs - aliased + temp)'}


# ------------------------------------------------------------------------------
# The ceiling MFU is measured against.
# ------------------------------------------------------------------------------
def peak_flops_per_device() -> tuple[float, str]:
  """(peak FLOP/s of one device, where it comes from): the spec sheet, else a measured matmul.

  Accelerators: the dense bfloat16 peak of `metrics.PEAK_FLOPS`. Other
  devices: the best FLOP/s of a jitted matmul measured now (float32 on a
  CPU, bfloat16 on an accelerator of unknown kind), so MFU reads as a share
  of what this machine's XLA reaches.
  """
  device = jax.devices()[0]
  if device.device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device.device_kind], f'{device.device_kind} bf16 spec sheet'
  dtype = jnp.float32 if device.platform == 'cpu' else jnp.bfloat16
  best, size = matmul_ceiling(dtype=dtype)
  return best, (f'measured {jnp.dtype(dtype).name} matmul {size}x{size} on '
                f'{device.device_kind or device.platform}')


def matmul_ceiling(sizes: tuple[int, ...] = (256, 512, 1024, 2048), repeats: int = 5,
                   dtype: Any = jnp.float32) -> tuple[float, int]:
  """(best FLOP/s, its size) of a jitted (n, n) @ (n, n) of `dtype` on the default device."""
  matmul = jax.jit(jnp.matmul)
  best, best_size = 0.0, 0
  for size in sizes:
    a = jax.random.normal(jax.random.key(size), (size, size), dtype)
    matmul(a, a).block_until_ready()  # Compile.
    seconds = []
    for _ in range(repeats):
      start = time.perf_counter()
      matmul(a, a).block_until_ready()
      seconds.append(time.perf_counter() - start)
    rate = 2 * size ** 3 / min(seconds)
    if rate > best:
      best, best_size = rate, size
  return best, best_size


# ------------------------------------------------------------------------------
# The reported numbers.
# ------------------------------------------------------------------------------
def summary(name: str, times: StepTimes, peak: float, peak_source: str) -> dict[str, Any]:
  """The benchmark's results as a flat dict (the JSON line)."""
  config, median = times.config, float(np.median(times.step_s))
  devices, accum = jax.device_count(), config.train.grad_accum_steps
  # MFU counts the model's FLOPs (PaLM's definition); XLA's count stands in when unknown,
  # scaled by the micro-batches its cost analysis saw once (see `xla_flops`).
  useful = times.model_flops or (times.xla_flops and times.xla_flops * accum)
  source = 'model (analytic)' if times.model_flops else (
      'xla' if accum == 1 else f'xla x grad_accum_steps {accum}')
  achieved = useful / median / devices if useful else None
  return {
      'config': name, 'method': config.method,
      'platform': jax.devices()[0].platform, 'device_kind': jax.devices()[0].device_kind,
      'devices': devices, 'batch_size': config.data.batch_size,
      'steps': len(times.step_s), 'compile_s': times.compile_s,
      'step_time_s': median,
      'step_time_p10_s': float(np.percentile(times.step_s, 10)),
      'step_time_p90_s': float(np.percentile(times.step_s, 90)),
      'step_time_min_s': float(times.step_s.min()),
      'step_time_max_s': float(times.step_s.max()),
      'examples_per_s': config.data.batch_size / median,
      f'{times.unit}_per_s': times.units_per_step / median,
      'flops_per_step': times.xla_flops,
      'model_flops_per_step': times.model_flops,
      'flops_per_s_per_device': achieved,
      'peak_flops_per_device': peak, 'peak_source': peak_source,
      'mfu': achieved / peak if achieved else None,
      'mfu_flops': source, 'grad_accum_steps': accum,
      'input_wait_fraction': float(times.input_s.sum() / times.step_s.sum()),
      'loss': times.loss,
      **times.memory,
  }
