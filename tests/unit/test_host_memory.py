"""cen_jax/host_memory.py: with the setting, a freed large buffer stays in the process (resident,
for the next allocation) until released on request; without it (CEN_JAX_KEEP_HOST_MEMORY=0),
glibc unmaps it at once."""

import os
import subprocess
import sys

import pytest

from cen_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A fresh process: configures the allocator, then prints how much of a written and freed
# 64 MiB buffer is still resident (/proc/self/statm).
PROGRAM = '''
import os, sys
from cen_jax import host_memory
print(host_memory.keep_freed_host_memory())
import numpy as np
resident = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
before = resident()
np.ones(64 * 2 ** 20 // 8).sum()  # allocate, write, free
print(resident() - before)
print(host_memory.release_freed_host_memory())
print(resident() - before)
'''


def run(keep: bool):
  """(applied, bytes of the freed buffer still resident, released, bytes resident after the
  release) in a fresh process."""
  env = dict(os.environ, CEN_JAX_KEEP_HOST_MEMORY='1' if keep else '0')
  out = subprocess.run([sys.executable, '-c', PROGRAM.format(root=ROOT)], env=env,
                       capture_output=True, text=True, check=True).stdout.split()
  return out[0] == 'True', int(out[1]), out[2] == 'True', int(out[3])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_freed_buffers_stay_in_the_process():
  applied, kept, released, left = run(keep=True)
  if not applied:
    pytest.skip('no glibc mallopt here')
  assert kept > 0.9 * 64 * 2 ** 20
  assert released and left < 0.1 * 64 * 2 ** 20  # malloc_trim gives it back on request
  applied, kept, released, _ = run(keep=False)
  assert not applied and not released
  assert kept < 0.1 * 64 * 2 ** 20  # the default allocator gave it back


def test_disabled_by_environment(monkeypatch):
  monkeypatch.setenv('CEN_JAX_KEEP_HOST_MEMORY', '0')
  assert host_memory.keep_freed_host_memory() is False


@pytest.mark.parametrize('config_file, expected', [('demo', True), ('nyudv2_cen', False),
                                                   ('demo_translation', True),
                                                   ('taskonomy_cen_shade_texture_to_rgb', False)])
def test_cpu_dispatch_follows_the_config(config_file, expected):
  """The demos (small steps) keep JAX's asynchronous CPU dispatch; real-size configs run each step
  on the calling thread; a config without the key leaves JAX's setting alone."""
  import importlib

  import jax
  import ml_collections
  before = jax.config.read('jax_cpu_enable_async_dispatch')
  try:
    config = importlib.import_module(f'cen_jax.configs.{config_file}').get_config()
    host_memory.use_async_cpu_dispatch_of(config)
    assert jax.config.read('jax_cpu_enable_async_dispatch') is expected
    jax.config.update('jax_cpu_enable_async_dispatch', not expected)
    host_memory.use_async_cpu_dispatch_of(ml_collections.ConfigDict({'eval': {'batch_size': 2}}))
    assert jax.config.read('jax_cpu_enable_async_dispatch') is (not expected)
  finally:
    jax.config.update('jax_cpu_enable_async_dispatch', before)
