"""Host memory: glibc's malloc told to keep freed memory for reuse (issue 15).

Every step, XLA:CPU allocates its temporaries and outputs afresh and frees
them after. With glibc's defaults a large block (over 32 MB at most; the
threshold adapts) is mmap'd and unmapped on free, and blocks freed by XLA's
worker threads live in per-thread arenas of at most 64 MB, which also mmap
what does not fit. So each step touches new pages, and the kernel zeroes
every one on its first write: in the SimCLR side-by-side step, ~2.4 million
page faults in a 10-step run; a (512, 32, 32, 16) element-wise op took
18.7 ms with a fresh output, 3.8 ms in reused memory
(docs/benchmarks.md, "Kept", 1 December).

`keep_freed_memory` sets, for the process, through `mallopt(3)`:
one arena (M_ARENA_MAX = 1, so blocks freed by any thread serve every
other), no mmap'd blocks (M_MMAP_MAX = 0: large ones come from the heap,
too) and no trimming of the heap's top (M_TRIM_THRESHOLD at its maximum),
as the `MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`
environment variables would before the process starts. The process then
keeps its peak heap mapped; its resident size does not shrink after a peak,
which is what the next step would allocate anyway. PyTorch's CPU tuning
guide recommends the same reuse through jemalloc or TCMalloc.

It must run before jax starts its backend: a thread's arena is chosen at its
first allocation, and glibc fixes the arena limit when the first extra arena
is made. The entry points (`ssl_jax.main`, `ssl_jax.bench`, `ssl_jax.probe`,
`ssl_jax.sample`) call it first, and so do the benchmark scripts that time
jax in their own process. It does nothing where the C library is not
glibc, where the user already chose (any of those variables, or
`GLIBC_TUNABLES`, or a malloc preloaded through LD_PRELOAD), or with
SSL_JAX_KEEP_FREED_MEMORY=0.
"""

import ctypes
import ctypes.util
import os

from absl import logging

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
# (mallopt parameter, its environment variable, value).
SETTINGS = ((M_ARENA_MAX, 'MALLOC_ARENA_MAX', 1), (M_MMAP_MAX, 'MALLOC_MMAP_MAX_', 0),
            (M_TRIM_THRESHOLD, 'MALLOC_TRIM_THRESHOLD_', 2**31 - 1))
# The same settings for a process started with them (benchmarks/speed_side_by_side.py's peers).
ENVIRONMENT = {name: str(value) for _, name, value in SETTINGS}
USER_SETTINGS = (*ENVIRONMENT, 'MALLOC_MMAP_THRESHOLD_', 'GLIBC_TUNABLES')


def glibc() -> ctypes.CDLL | None:
  """The process's C library if it is glibc (it has gnu_get_libc_version), else None."""
  name = ctypes.util.find_library('c')
  if name is None:
    return None
  try:
    libc = ctypes.CDLL(name)
  except OSError:
    return None
  return libc if hasattr(libc, 'gnu_get_libc_version') and hasattr(libc, 'mallopt') else None


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep and reuse freed memory (above); whether it did."""
  chosen = [name for name in USER_SETTINGS if os.environ.get(name)]
  if 'malloc' in os.environ.get('LD_PRELOAD', ''):  # jemalloc, tcmalloc, mimalloc
    chosen.append('LD_PRELOAD')
  if os.environ.get('SSL_JAX_KEEP_FREED_MEMORY', '1') == '0' or chosen:
    logging.info('host memory: malloc left as it is (%s)',
                 ', '.join(chosen) or 'SSL_JAX_KEEP_FREED_MEMORY=0')
    return False
  libc = glibc()
  if libc is None:
    return False
  done = all(libc.mallopt(param, value) == 1 for param, _, value in SETTINGS)
  if not done:
    logging.warning('host memory: mallopt refused a setting; malloc may still unmap freed memory')
  return done
