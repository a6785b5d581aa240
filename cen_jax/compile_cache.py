"""JAX's persistent compilation cache for every run of main.py: a second `train`, `eval` or
`predict` of the same config and shapes loads its compiled programs from disk instead of
compiling them again.

config.compile_cache_dir:
- 'default': $JAX_COMPILATION_CACHE_DIR when set, else $XDG_CACHE_HOME/cen_jax/xla
  (~/.cache/cen_jax/xla);
- a folder: that folder (shared by every config: an entry's key is the program, the compile
  options, the XLA flags and the JAX version, so configs never see each other's entries);
- '': off.

A folder that cannot be created or written is reported in one line and the run compiles as
without a cache; an entry that cannot be read (truncated, corrupt) is reported in one line by
JAX and compiled again (`one_line_warnings`).
"""

import os
import sys
import tempfile
import warnings

DEFAULT = 'default'


def cache_dir(config) -> str:
  """The folder config.compile_cache_dir names ('' when the cache is off)."""
  value = str(config.get('compile_cache_dir', DEFAULT))
  if value != DEFAULT:
    return os.path.expanduser(value)
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'cen_jax', 'xla')


def writable(path: str) -> str:
  """'' when `path` is a folder this process can create and write to, else why not."""
  try:
    os.makedirs(path, exist_ok=True)
    tempfile.NamedTemporaryFile(dir=path, prefix='.probe-').close()  # deleted on close
  except OSError as e:
    return e.strerror or type(e).__name__
  return ''


def use_compile_cache(config) -> str:
  """Point JAX's persistent cache at config.compile_cache_dir (before the first compile).
  Returns the folder in use, '' when off or unusable (said in one line on stderr). Call it
  after hiding other warnings: JAX's cache errors are then let through (`one_line_warnings`)."""
  import jax  # pylint: disable=g-import-not-at-top: after host_memory.keep_freed_host_memory
  path = cache_dir(config)
  problem = writable(path) if path else ''
  if problem:
    print(f'warning: compile cache {path}: {problem}; compiling without a cache',
          file=sys.stderr)
    path = ''
  jax.config.update('jax_compilation_cache_dir', path or None)
  jax.config.update('jax_enable_compilation_cache', bool(path))
  one_line_warnings()
  return path


def one_line_warnings() -> None:
  """Show JAX's cache read/write errors (main.py hides other warnings) as one line each."""
  warnings.filterwarnings('default', message='Error (reading|writing) persistent compilation')
  warnings.formatwarning = lambda message, *unused_args, **unused_kwargs: f'warning: {message}\n'
