"""XLA compiler options for ssl_jax's jitted steps: convolutions off YNNPACK on CPU.

XLA:CPU in jaxlib 0.10.2 hands each convolution to YNNPACK (XNNPACK's
successor) by default. Its kernel gradient of a thin convolution, a
convolution whose 32 x 32 "window" is the whole image and whose features
are the batch, runs at ~3 GFLOP/s: the stage-0 3x3 16 -> 16 kernel gradient
of the SimCLR CIFAR workload (batch 512 x 32 x 32) took 462 ms; with
YNNPACK's convolutions off XLA runs it through Eigen in 69 ms, and the
forward and input-gradient convolutions of the wider stages up to ~2-4x
faster too (`python -m benchmarks.conv_bench`). The whole SimCLR
side-by-side step went from 4.24 to 2.17 s (1.95x, docs/benchmarks.md,
"Kept"). YNNPACK keeps the matmul and reduction fusions.

`step_options()` is what the train step and the evaluations' feature pass
(`eval/passes.py`; a ResNet-18 forward at 32 px 1.3x) pass as `jax.jit(...,
compiler_options=...)`: the jaxlib-0.10.2 default fusion list less
`individual_convolution`, i.e. `dot,reduce` (the default with
`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` compiles to
the same HLO as `dot,reduce`, checked on a model of matmuls, GELU, softmax,
reductions and a conv). It sets nothing
- off CPU (the option is XLA:CPU's),
- on a jaxlib other than the one measured (another's default list may
  differ, and an unknown value fails the compile),
- when XLA_FLAGS already names the option: the user's choice wins, e.g.
  `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot,reduce,individual_convolution`
  restores jaxlib 0.10.2's default (not `+individual_convolution`: the
  flag's own default list is empty, so that would leave convolutions alone
  in YNNPACK and take the matmuls out).
"""

import functools
import importlib.metadata
import os

YNN_FUSION_TYPES = 'xla_cpu_experimental_ynn_fusion_type'
# jaxlib 0.10.2's YNNPACK fusion types, less individual_convolution (see above).
CPU_YNN_WITHOUT_CONVOLUTIONS = 'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE'
MEASURED_JAXLIB = '0.10.2'


@functools.cache
def _jaxlib_version() -> str:
  return importlib.metadata.version('jaxlib')


def step_options(platform: str) -> dict[str, str] | None:
  """Compiler options for a jitted step on `platform` ('cpu', 'gpu', 'tpu'), or None."""
  if (platform != 'cpu' or _jaxlib_version() != MEASURED_JAXLIB
      or YNN_FUSION_TYPES in os.environ.get('XLA_FLAGS', '')):
    return None
  return {YNN_FUSION_TYPES: CPU_YNN_WITHOUT_CONVOLUTIONS}
