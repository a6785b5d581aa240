"""Atomic file writes: a reader never sees a half-written file, and a failure or crash leaves
the previous file in place."""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_write(path, mode: str = 'w'):
  """Yields a file object for a temp file beside `path`; on success it is fsync-ed and renamed
  onto `path` (parent directories are created)."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.',
                             suffix='.tmp')
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
