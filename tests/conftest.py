"""Test setup: 8 forced CPU devices (multi-device tests), compiled with the fast-compile flags
of tests/helpers/env.py. cen_jax is imported as installed
(`pip install -e .`, scripts/test.sh); pytest puts the repository root on sys.path for the
`tests` helpers (pyproject.toml, tool.pytest pythonpath)."""

import os
import tempfile

from tests.helpers.env import xla_flags

os.environ['XLA_FLAGS'] = xla_flags(num_devices=8)  # and the fast-compile flags (helpers/env.py)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the whole run, shared by the xdist workers and every
# main.py the tests start: the end-to-end tests compile the same tiny programs in many
# processes. A hit loads the same executable, so no figure changes.
_RUN = os.environ.get('PYTEST_XDIST_TESTRUNUID') or str(os.getpid())
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'cen_jax_test_compile_cache_{_RUN}'))
# Every program, however quick to compile: the killed and the resumed runs of a test, and the
# processes of a multi-process run, compile the same ones.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')


def pytest_collection_modifyitems(config, items):
  """Every test under tests/parity/ needs PyTorch: marked `torch`, so that `-m "not torch"`
  (the Python 3.12 venv) leaves them out and `-m torch` (.venv-torch) runs only them."""
  import pytest
  parity = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'parity') + os.sep
  for item in items:
    if str(item.fspath).startswith(parity):
      item.add_marker(pytest.mark.torch)
