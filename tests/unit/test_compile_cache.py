"""cen_jax/compile_cache.py: which folder config.compile_cache_dir names; a second process loads
its program from the cache; the start-up cache calls a stored executable untraced; an unusable
folder or a damaged entry costs a compile and one line, never the run."""

import functools
import os
import subprocess
import sys
import uuid

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


def damage_file(path, damage: str) -> None:
  data = bytearray(path.read_bytes())
  if damage == 'flipped byte':
    data[len(data) // 2] ^= 0xFF
  elif damage == 'truncated':
    data = data[:len(data) // 3]
  else:
    data = bytearray(b'not a compiled program')
  path.write_bytes(bytes(data))


@pytest.mark.parametrize('damage', ['flipped byte', 'truncated', 'not an entry'])
def test_a_damaged_entry_is_compiled_again_with_one_line(tmp_path, damage):
  folder = tmp_path / 'cache'
  value, _, _ = run(folder)
  entries = sorted(n for n in os.listdir(folder) if n.startswith('jit__lambda'))
  assert len(entries) == 1
  path = folder / entries[0]
  damage_file(path, damage)
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


# ----------------------------------------------------------------------------- start-up cache
# JAX's own cache (tests/conftest.py) is on in this process and shared by the whole test run:
# each test's program adds a constant of its own, so that JAX's cache has never seen it.

def counting_program(calls, salt):
  """A jittable function that counts how often it is traced."""
  def program(params, x):
    calls.append(1)
    return {'y': jnp.tanh(x @ params['w']) + params['b'] + salt}
  return program


def arguments(n=3):
  params = {'w': jnp.arange(16.0).reshape(4, 4) / 16.0, 'b': jnp.ones(4)}
  return params, jnp.linspace(-1.0, 1.0, 4 * n).reshape(n, 4)


def by_hand(salt, n=3):
  """counting_program's value, in numpy."""
  params, x = jax.tree.map(np.asarray, arguments(n))
  return np.tanh(x @ params['w']) + params['b'] + np.float32(salt)


@pytest.fixture
def salt():
  return float(uuid.uuid4().int % 10 ** 6) / 10 ** 6


@pytest.fixture
def folder(tmp_path, monkeypatch):
  """The start-up cache in a fresh folder."""
  monkeypatch.setattr(compile_cache, 'startup_folder', lambda: str(tmp_path / 'startup'))
  return tmp_path / 'startup'


def cached(calls, salt, name='x', n=3):
  """counting_program's value through a new CachedJit of a new function (as in a new process:
  jax.jit's in-memory trace cache is per function)."""
  program = counting_program(calls, salt)
  return compile_cache.CachedJit(program, config(name))(*arguments(n))['y']


def close(value, expected):
  np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-6)


def test_a_stored_executable_is_called_without_tracing(folder, salt):
  calls = []
  first = cached(calls, salt)
  assert calls == [1] and len(os.listdir(folder)) == 1
  second = cached(calls, salt)  # loads the entry: no trace, the same values
  assert calls == [1]
  close(first, by_hand(salt))
  np.testing.assert_array_equal(second, first)
  # Other shapes are another program: traced and stored.
  close(cached(calls, salt, n=5), by_hand(salt, n=5))
  assert calls == [1, 1] and len(os.listdir(folder)) == 2
  # Another config is another entry, traced; its executable (the same program as the first)
  # comes from JAX's cache, so it is not stored (test_a_program_from_jax_cache_...).
  close(cached(calls, salt, name='y'), by_hand(salt))
  assert calls == [1, 1, 1] and len(os.listdir(folder)) == 2


def test_the_cache_off_is_plain_jit(monkeypatch, salt):
  monkeypatch.setattr(compile_cache, 'startup_folder', lambda: '')
  calls = []
  for _ in range(2):
    close(cached(calls, salt), by_hand(salt))
  assert calls == [1, 1]


def test_a_program_from_jax_cache_is_used_but_not_stored(folder, salt):
  assert jax.config.jax_compilation_cache_dir, 'tests/conftest.py turns JAX\'s cache on'
  calls = []
  jax.jit(counting_program(calls, salt))(*arguments())  # compiled: now in JAX's cache
  close(cached(calls, salt), by_hand(salt))  # traced, compiled executable loaded from it
  assert calls == [1, 1] and not folder.exists()
  close(cached(calls, salt), by_hand(salt))
  assert calls == [1, 1, 1]


@pytest.mark.parametrize('damage', ['flipped byte', 'truncated', 'not an entry'])
def test_a_damaged_executable_is_compiled_again_with_one_line(folder, capsys, damage, salt):
  calls = []
  expected = cached(calls, salt)
  (path,) = folder.iterdir()
  damage_file(path, damage)
  capsys.readouterr()
  np.testing.assert_array_equal(cached(calls, salt), expected)
  lines = capsys.readouterr().err.splitlines()
  assert lines == [f'warning: start-up cache entry {path}: damaged (checksum); tracing again']
  assert calls == [1, 1]


def test_an_abstract_tree_is_stored_once(folder):
  calls = []

  def make():
    calls.append(1)
    return jax.eval_shape(lambda: {'w': jnp.zeros((3, 4)), 'n': jnp.zeros((), jnp.int32)})

  first = compile_cache.cached_abstract('tree', config('x'), make)
  second = compile_cache.cached_abstract('tree', config('x'), make)
  assert calls == [1] and first == second
  assert second['w'] == jax.ShapeDtypeStruct((3, 4), jnp.float32)


def test_a_folder_that_cannot_be_written_costs_one_line(tmp_path, monkeypatch, capsys, salt):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  monkeypatch.setattr(compile_cache, 'startup_folder', lambda: str(blocker / 'startup'))
  close(cached([], salt), by_hand(salt))
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f'warning: start-up cache entry {blocker / "startup"}') and \
      line.endswith('not written (Not a directory); going on without it')


def test_partials_with_other_flags_are_other_programs():
  def step(x, *, model, flag):
    return x
  names = {compile_cache.function_name(functools.partial(step, model=object(), flag=f))
           for f in (True, False)}
  assert len(names) == 2
  assert all(n.startswith(f'{__name__}.test_partials_with_other_flags_are_other_programs'
                          '.<locals>.step:') for n in names)


def test_the_fingerprint_reads_modules_loaded_from_outside_the_installation(tmp_path,
                                                                           monkeypatch):
  (tmp_path / 'my_fusion_for_the_key.py').write_text('SCALE = 1\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  import my_fusion_for_the_key  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  try:
    files = compile_cache._source_files()  # pylint: disable=protected-access
    assert str(tmp_path / 'my_fusion_for_the_key.py') in files
    assert os.path.join(os.path.dirname(compile_cache.__file__), 'layers.py') in files
    assert not any('site-packages' in f for f in files)
  finally:
    del sys.modules[my_fusion_for_the_key.__name__]
