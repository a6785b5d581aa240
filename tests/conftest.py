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


# Modules with tests of a minute or more on 2 cores (pytest --durations), the longest tests'
# first: they run first, in this order, so that the xdist workers end on short tests together
# instead of one waiting out a long one.
SLOW_MODULES = (
    'tests/e2e/test_multiprocess_main.py', 'tests/e2e/test_multiprocess.py',
    'tests/e2e/test_end_to_end.py', 'tests/e2e/test_ablate.py', 'tests/e2e/test_examples.py',
    'tests/unit/test_train_step.py', 'tests/unit/test_fid.py', 'tests/unit/test_dense.py',
    'tests/unit/test_translation_step.py', 'tests/unit/test_fusion_registry.py',
    'tests/e2e/test_wheel.py', 'tests/e2e/test_translation_end_to_end.py',
    'tests/unit/test_checkpoints.py', 'tests/unit/test_mit_segmentation.py',
    'tests/unit/test_mit_translation.py', 'tests/e2e/',
    # the parity suite (a run of its own, .venv-torch)
    'tests/parity/test_torch_io.py', 'tests/parity/test_mit_torch.py',
    'tests/parity/test_mit_translation_torch.py',
    'tests/parity/test_gan_two_steps.py', 'tests/parity/test_translation_interop.py',
    'tests/parity/test_pix2pix.py', 'tests/parity/test_fid_torch.py')

# Modules whose module-scoped fixtures are costly (a trained workdir, an installed wheel, a
# prepared dataset): their tests run on one xdist worker (`--dist loadgroup`), so that each
# fixture is built once rather than once on each worker.
SHARED_FIXTURE_MODULES = (
    'tests/e2e/test_end_to_end.py', 'tests/e2e/test_translation_end_to_end.py',
    'tests/e2e/test_mit_end_to_end.py', 'tests/e2e/test_mit_translation_end_to_end.py',
    'tests/e2e/test_wheel.py',
    'tests/e2e/test_prepare_swap.py', 'tests/unit/test_fid.py')


def pytest_collection_modifyitems(config, items):
  """Every test under tests/parity/ needs PyTorch: marked `torch`, so that `-m "not torch"`
  (the Python 3.12 venv) leaves them out and `-m torch` (.venv-torch) runs only them.
  Tests of SLOW_MODULES are marked `slow` and run first, in its order (scripts/test.sh keeps
  it: --no-loadscope-reorder); SHARED_FIXTURE_MODULES each get an xdist group."""
  import pytest
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
  rank = {}
  for item in items:
    path = str(item.fspath)[len(root):].replace(os.sep, '/')
    if path.startswith('tests/parity/'):
      item.add_marker(pytest.mark.torch)
    slow = [i for i, prefix in enumerate(SLOW_MODULES) if path.startswith(prefix)]
    if slow:
      item.add_marker(pytest.mark.slow)
    if path in SHARED_FIXTURE_MODULES:
      item.add_marker(pytest.mark.xdist_group(os.path.basename(path)[:-3]))
    rank[item.nodeid] = slow[0] if slow else len(SLOW_MODULES)
  items.sort(key=lambda item: rank[item.nodeid])  # stable: file order within a rank
