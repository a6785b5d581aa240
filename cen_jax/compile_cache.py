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

The start-up cache (the folder's `cen_jax_startup/`, below) also keeps what JAX's cache cannot
spare a warm run: the checkpoint template (`cached_abstract`) and the compiled eval and predict
functions (`CachedJit`), keyed on the config, the code (`fingerprint`) and the argument shapes.
Its entries carry a checksum; a damaged one costs a trace and one line.
"""

import functools
import hashlib
import os
import pickle
import sys
import tempfile
import threading
from typing import Callable, Optional
import warnings

from cen_jax import io_utils

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


# ----------------------------------------------------------------------------- start-up cache
# JAX's cache above keys an entry on the lowered program, so a warm run still traces and lowers
# every function before it can look the entry up: for the demo's eval that is the model's init
# (for the checkpoint's template) and its forward, most of a warm start. The entries below skip
# that: abstract trees (pickled) and compiled executables (jax serialize_executable), keyed on
# what the traced program depends on instead (`fingerprint`).

ENTRY_FOLDER = 'cen_jax_startup'
_MAGIC = b'cen_jax startup entry 1\n'
_LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'orbax.checkpoint')


def startup_folder() -> str:
  """Where start-up entries go: a folder inside JAX's cache folder ('' when the cache is off
  or several processes run, whose executables span other hosts' devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  path = jax.config.jax_compilation_cache_dir
  if not path or not jax.config.jax_enable_compilation_cache or jax.process_count() > 1:
    return ''
  return os.path.join(path, ENTRY_FOLDER)


def _source_files() -> list:
  """cen_jax's own sources, and every module loaded from outside the Python installation
  (the user's configs, fusions and builders): code that decides a traced program."""
  import site  # pylint: disable=g-import-not-at-top
  package = os.path.dirname(os.path.abspath(__file__))
  files = {os.path.join(d, f) for d, _, names in os.walk(package) for f in names
           if f.endswith('.py')}
  installed = tuple(os.path.abspath(p) + os.sep for p in {
      sys.prefix, sys.base_prefix, sys.exec_prefix, *site.getsitepackages(),
      site.getusersitepackages()})
  for module in list(sys.modules.values()):
    path = getattr(module, '__file__', None)
    if path and path.endswith('.py') and not os.path.abspath(path).startswith(installed):
      files.add(os.path.abspath(path))
  return sorted(files)


@functools.lru_cache(maxsize=None)
def fingerprint() -> str:
  """Hash of what a traced program depends on beyond its config and argument shapes: the
  sources (`_source_files`, read once per process, at the first entry), the libraries'
  versions, XLA_FLAGS and JAX's numerics flags, the backend and devices, and the CPU."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  for path in _source_files():
    try:
      with open(path, 'rb') as f:
        digest.update(path.encode() + b'\0' + f.read() + b'\0')
    except OSError:
      digest.update(path.encode() + b'\0unreadable\0')
  versions = []
  for name in _LIBRARIES:
    try:
      versions.append(importlib.metadata.version(name.replace('.', '-')))
    except importlib.metadata.PackageNotFoundError:
      versions.append('-')
  cpu = ''
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      cpu = ''.join(sorted({l for l in f if l.startswith(('model name', 'flags'))}))
  devices = [(d.id, d.platform, d.device_kind) for d in jax.devices()]
  flags = {name: str(getattr(jax.config, name)) for name in (
      'jax_enable_x64', 'jax_default_matmul_precision', 'jax_numpy_rank_promotion',
      'jax_default_prng_impl', 'jax_threefry_partitionable')}
  digest.update(repr((versions, os.environ.get('XLA_FLAGS', ''), flags, devices,
                      jax.devices()[0].client.platform_version, cpu)).encode())
  return digest.hexdigest()


def entry_key(name: str, config, *parts) -> str:
  """The entry of `name` for this config (every key: a config that differs in anything, even
  a data path, is a new entry) and `parts` (argument signatures)."""
  text = config.to_json_best_effort(sort_keys=True) if hasattr(config, 'to_json_best_effort') \
      else repr(config)
  digest = hashlib.sha256(repr((fingerprint(), name, text, parts)).encode()).hexdigest()
  stem = ''.join(c if c.isalnum() else '_' for c in name.split(':')[0].rsplit('.', 1)[-1])
  return f'{stem[:40]}-{digest[:40]}'  # readable, and unique by the digest


def _say(path: str, problem: str, then: str) -> None:
  print(f'warning: start-up cache entry {path}: {problem}; {then}', file=sys.stderr)


def read_entry(path: str):
  """The value stored at `path`; None when there is none, or (said in one line) when it cannot
  be read: damaged, truncated, or written by something else. A checksum is checked before
  anything is unpickled, so a damaged executable is never loaded."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except (FileNotFoundError, NotADirectoryError):  # no entry (writing it says why it cannot)
    return None
  except OSError as e:
    _say(path, e.strerror or type(e).__name__, 'tracing again')
    return None
  head = len(_MAGIC) + 65
  if not data.startswith(_MAGIC) or len(data) < head or \
      hashlib.sha256(data[head:]).hexdigest().encode() != data[len(_MAGIC):head - 1]:
    _say(path, 'damaged (checksum)', 'tracing again')
    return None
  try:
    return pickle.loads(data[head:])
  except Exception as e:  # pylint: disable=broad-except: a stale pickle of another version
    _say(path, f'{type(e).__name__}: {str(e)[:120]}', 'tracing again')
    return None


def write_entry(path: str, value) -> None:
  """Stores `value` at `path` whole or not at all (a temporary file renamed over it); a folder
  that cannot be written costs one line, never the run."""
  try:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
  except Exception as e:  # pylint: disable=broad-except: a value that does not pickle
    _say(path, f'not stored ({type(e).__name__}: {str(e)[:120]})', 'going on without it')
    return
  data = _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b'\n' + payload
  try:
    with io_utils.atomic_write(path, 'wb') as f:
      f.write(data)
  except OSError as e:
    _say(path, f'not written ({e.strerror or type(e).__name__})', 'going on without it')


def cached_abstract(name: str, config, make: Callable):
  """`make()` (a pytree of jax.ShapeDtypeStruct, e.g. from jax.eval_shape), read from the
  start-up cache when an earlier run of the same config and code stored it."""
  folder = startup_folder()
  if not folder:
    return make()
  path = os.path.join(folder, entry_key(name, config) + '.tree')
  value = read_entry(path)
  if value is None:
    value = make()
    write_entry(path, value)
  return value


def _signature(args) -> Optional[tuple]:
  """What a compiled program is specialised to: the arguments' tree, shapes, dtypes and
  placements; None when a leaf is not an array (the call is left to jax.jit)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaves, tree = jax.tree.flatten(args)
  out = []
  for x in leaves:  # hashable objects, no strings: this runs on every call (every eval batch)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended):
      return None  # PRNG keys: left to jax.jit
    if isinstance(x, jax.Array):
      out.append((x.shape, x.dtype, x.weak_type, x.sharding))
    elif isinstance(x, np.ndarray):
      out.append((x.shape, x.dtype, 'host'))
    else:
      return None
  return tree, tuple(out)


def function_name(fn: Callable) -> str:
  """module.qualname:line of `fn`; for a functools.partial, also its arguments of plain types
  (flags such as with_target_features; a model or config is the config's, already keyed)."""
  target = getattr(fn, 'func', fn)
  code = getattr(target, '__code__', None)
  name = f'{target.__module__}.{target.__qualname__}:{code.co_firstlineno if code else 0}'
  if fn is not target:
    plain = (bool, int, float, str, type(None))
    bound = [repr(a) if isinstance(a, plain) else type(a).__name__ for a in fn.args]
    bound += [f'{k}={v!r}' if isinstance(v, plain) else f'{k}:{type(v).__name__}'
              for k, v in sorted(fn.keywords.items())]
    name += f'({", ".join(bound)})'
  return name


_JAX_CACHE_HITS = threading.local()


def _count_jax_cache_hits(name: str, **unused_kwargs) -> None:
  if name == '/jax/compilation_cache/cache_hits':
    _JAX_CACHE_HITS.count = getattr(_JAX_CACHE_HITS, 'count', 0) + 1


@functools.lru_cache(maxsize=None)
def _listen_for_jax_cache_hits() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.monitoring.register_event_listener(_count_jax_cache_hits)


class CachedJit:
  """jax.jit(fn, **jit_kwargs) whose compiled programs are also kept in the start-up cache
  (jax serialize_executable): a second process with the same config, code and argument
  shapes calls the stored executable without tracing `fn`. Off with the cache, for several
  processes, and for arguments that are not all arrays; then it is the jitted function.

  Only a program compiled here is stored: XLA:CPU cannot serialize again an executable it
  loaded from JAX's cache (the copy fails when run), so a program JAX's cache served is used
  but not stored, and later runs trace it as plain jit does."""

  def __init__(self, fn: Callable, config, *, name: str = '', **jit_kwargs):
    import jax  # pylint: disable=g-import-not-at-top
    self.name = name or function_name(fn)
    self.config = config
    self.jitted = jax.jit(fn, **jit_kwargs)
    self.compiled = {}
    self.folder = None  # startup_folder(), at the first call (after main.py set the cache up)

  def __call__(self, *args):
    if self.folder is None:
      self.folder = startup_folder()
    signature = _signature(args) if self.folder else None
    if signature is None:
      return self.jitted(*args)
    compiled = self.compiled.get(signature)
    if compiled is None:
      compiled = self.compiled[signature] = self._load_or_compile(self.folder, signature, args)
    return compiled(*args)

  def _load_or_compile(self, folder: str, signature, args):
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import serialize_executable  # pylint: disable=g-import-not-at-top
    path = os.path.join(folder, entry_key(self.name, self.config, signature) + '.xla')
    stored = read_entry(path)
    if stored is not None:
      try:
        serialized, device_ids = stored
        by_id = {d.id: d for d in jax.devices()}
        return serialize_executable.deserialize_and_load(
            *serialized, execution_devices=[by_id[i] for i in device_ids])
      except Exception as e:  # pylint: disable=broad-except: e.g. another XLA's executable
        _say(path, f'{type(e).__name__}: {str(e)[:120]}', 'compiling again')
    _listen_for_jax_cache_hits()
    hits = getattr(_JAX_CACHE_HITS, 'count', 0)
    compiled = self.jitted.lower(*args).compile()
    if getattr(_JAX_CACHE_HITS, 'count', 0) != hits:
      return compiled  # loaded from JAX's cache: it would not run once stored again
    try:
      # The devices it runs on (serialize keeps the program, not its device assignment).
      devices = compiled._executable._unloaded_executable.device_list  # pylint: disable=protected-access
      write_entry(path, (serialize_executable.serialize(compiled), [d.id for d in devices]))
    except Exception as e:  # pylint: disable=broad-except: a backend that cannot serialize
      _say(path, f'not stored ({type(e).__name__}: {str(e)[:120]})', 'going on without it')
    return compiled
