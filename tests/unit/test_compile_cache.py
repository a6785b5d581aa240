"""cen_jax/compile_cache.py: which folder config.compile_cache_dir names; a second process loads
its program from the cache; an unusable folder or a damaged entry costs a compile and one line,
never the run."""

import os
import subprocess
import sys

import ml_collections
import pytest

from cen_jax import compile_cache
from tests.helpers.env import child_env

# What main.py does before its first computation, then one jitted program. Prints its result and
# how many programs came from the cache.
PROGRAM = """
import sys, warnings
import ml_collections
from cen_jax import compile_cache
warnings.filterwarnings('ignore')  # as main.py
compile_cache.use_compile_cache(ml_collections.ConfigDict({'compile_cache_dir': sys.argv[1]}))
import jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith('cache_hits') else None)
x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
y = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)(x)
print(repr(float(y.sum())), len(hits))
"""


def config(value):
  return ml_collections.ConfigDict({'compile_cache_dir': value})


def run(folder):
  """(result, cache hits, stderr lines) of PROGRAM with the cache in `folder`."""
  env = child_env(drop=('JAX_COMPILATION_CACHE_DIR',))
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'  # cache even this quick program
  done = subprocess.run([sys.executable, '-c', PROGRAM, str(folder)], env=env,
                        capture_output=True, text=True, timeout=300, check=True)
  value, hits = done.stdout.split()
  return value, int(hits), done.stderr.splitlines()


def test_cache_dir_names_the_folder(monkeypatch, tmp_path):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert compile_cache.cache_dir(config('default')) == str(tmp_path / 'xdg' / 'cen_jax' / 'xla')
  assert compile_cache.cache_dir(ml_collections.ConfigDict()) == \
      str(tmp_path / 'xdg' / 'cen_jax' / 'xla')  # a config written before the key
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'env'))
  assert compile_cache.cache_dir(config('default')) == str(tmp_path / 'env')
  assert compile_cache.cache_dir(config(str(tmp_path / 'mine'))) == str(tmp_path / 'mine')
  assert compile_cache.cache_dir(config('')) == ''
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert compile_cache.cache_dir(config('~/c')) == str(tmp_path / 'home' / 'c')


def test_a_second_process_loads_the_program_from_the_cache(tmp_path):
  first = run(tmp_path / 'cache')
  assert first[1:] == (0, [])
  assert any(name.endswith('-cache') for name in os.listdir(tmp_path / 'cache'))
  second = run(tmp_path / 'cache')
  assert second[0] == first[0] and second[1] >= 1 and second[2] == []
  off = run('')
  assert off[0] == first[0] and off[1] == 0


@pytest.mark.parametrize('damage', ['flipped byte', 'truncated', 'not an entry'])
def test_a_damaged_entry_is_compiled_again_with_one_line(tmp_path, damage):
  folder = tmp_path / 'cache'
  value, _, _ = run(folder)
  entries = sorted(n for n in os.listdir(folder) if n.startswith('jit__lambda'))
  assert len(entries) == 1
  path = folder / entries[0]
  data = bytearray(path.read_bytes())
  if damage == 'flipped byte':
    data[len(data) // 2] ^= 0xFF
  elif damage == 'truncated':
    data = data[:len(data) // 3]
  else:
    data = bytearray(b'not a compiled program')
  path.write_bytes(bytes(data))
  again, _, lines = run(folder)
  assert again == value
  assert len(lines) == 1, lines
  assert lines[0].startswith('warning: Error reading persistent compilation cache entry') and \
      'jit__lambda' in lines[0]


def test_a_folder_that_cannot_be_written_is_one_line_and_the_run_goes_on(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  value, hits, lines = run(blocker / 'cache')
  assert value == run('')[0] and hits == 0
  assert lines == [f'warning: compile cache {blocker / "cache"}: Not a directory; '
                   'compiling without a cache']
