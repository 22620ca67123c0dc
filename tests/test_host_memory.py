"""glibc malloc keeps freed memory: a freed large buffer stays mapped, for the next one."""

import json
import os
import subprocess
import sys

import pytest

from ssl_jax import host_memory

# Resident memory after freeing a written 64 MB buffer, in a fresh process
# (malloc's settings are process-wide).
SCRIPT = """
import json, os
from ssl_jax import host_memory
kept = host_memory.keep_freed_memory()
import numpy as np
def resident():
  return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
a = np.ones(16 * 2**20, np.float32)
before = resident()
del a
print(json.dumps({'kept': kept, 'released': before - resident()}))
"""
SIZE = 64 * 2**20


def freed(env: dict[str, str]) -> dict:
  out = subprocess.run([sys.executable, '-c', SCRIPT], env=env, capture_output=True, text=True,
                       check=True)
  return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(host_memory.glibc() is None or not os.path.exists('/proc/self/statm'),
                    reason='glibc (mallopt) and Linux (/proc) only')
def test_freed_memory_is_reused_unless_the_user_chose():
  base = {k: v for k, v in os.environ.items()
          if k not in host_memory.USER_SETTINGS + ('SSL_JAX_KEEP_FREED_MEMORY',)}
  kept = freed(base)
  assert kept['kept'] and kept['released'] < SIZE // 10
  default = freed({**base, 'SSL_JAX_KEEP_FREED_MEMORY': '0'})  # glibc unmaps the block.
  assert not default['kept'] and default['released'] > SIZE * 9 // 10
  users = freed({**base, 'MALLOC_ARENA_MAX': '4'})
  assert not users['kept'] and users['released'] > SIZE * 9 // 10


def test_a_library_without_mallopt_is_left_alone(monkeypatch):
  monkeypatch.delenv('SSL_JAX_KEEP_FREED_MEMORY', raising=False)
  for name in host_memory.USER_SETTINGS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(host_memory, 'glibc', lambda: None)
  assert host_memory.keep_freed_memory() is False
