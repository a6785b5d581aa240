"""The built wheel, installed into a fresh virtual environment, works from a directory outside
the checkout: `import cen_jax` comes from site-packages, and the `cen-jax` command prints the
demo's summary and prepares the synthetic scenes (builders installed as cen_jax.datasets).

The fresh environment sees the test environment's packages through a .pth line, so pip resolves
the wheel's dependencies against them (and fails if one is missing or of the wrong version)
without downloading or unpacking them again: that took minutes of the test suite. A path added
by a .pth line is not itself scanned for .pth files, so the test environment's editable
cen_jax (a .pth import hook) stays inactive there."""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.helpers.env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(cmd, **kwargs):
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kwargs)
  assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
  return proc.stdout


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """(venv bin folder, a working directory outside the checkout)."""
  tmp = tmp_path_factory.mktemp('wheel')
  # Built from a copy of the sources: setuptools writes build/ into the tree it builds.
  source = tmp / 'source'
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      '.git', '.venv*', 'build', 'dist', '*.egg-info', '__pycache__', 'workdirs', 'tfds_data',
      '.hypothesis'))
  # Offline: setuptools from the test environment (the test extra), no isolated build env.
  run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-index',
       '--no-build-isolation', '-w', str(tmp / 'dist'), str(source)])
  wheels = [f for f in os.listdir(tmp / 'dist') if f.endswith('.whl')]
  assert len(wheels) == 1, wheels
  run([sys.executable, '-m', 'venv', '--without-pip', str(tmp / 'venv')])
  bin_dir = tmp / 'venv' / 'bin'
  site = run([str(bin_dir / 'python'), '-c', 'import sysconfig; print(sysconfig.get_paths()'
              '["purelib"])']).strip()
  with open(os.path.join(site, 'test_environment.pth'), 'w') as f:
    f.write(sysconfig.get_paths()['purelib'] + '\n')
  # The test environment's pip, installing into the fresh one; --no-index: every dependency
  # must already be there.
  run([sys.executable, '-m', 'pip', '--python', str(bin_dir / 'python'), 'install', '-q',
       '--no-index', str(tmp / 'dist' / wheels[0])])
  outside = tmp / 'elsewhere'
  outside.mkdir()
  return bin_dir, outside


def test_import_comes_from_site_packages(installed):
  bin_dir, outside = installed
  out = run([str(bin_dir / 'python'), '-c',
             'import cen_jax, cen_jax.datasets, cen_jax.configs.demo as d; '
             'print(cen_jax.__file__); print(cen_jax.datasets.__file__); print(d.__file__)'],
            cwd=outside, env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
  for path in out.split():
    assert 'site-packages' in path and not path.startswith(ROOT), path


def test_console_command_summary_and_prepare(installed):
  bin_dir, outside = installed
  env = child_env(drop=('PYTHONPATH',))
  config = os.path.join(ROOT, 'configs', 'demo.py')
  out = run([str(bin_dir / 'cen-jax'), f'--config={config}', '--mode=summary'], cwd=outside,
            env=env)
  assert 'params:' in out and 'gflops:' in out
  # The scenes' smallest builder config: rendering the demo's takes minutes of the suite.
  out = run([str(bin_dir / 'cen-jax'), f'--config={config}', '--mode=prepare',
             '--config.data.builder_config=tiny', f'--config.data.data_dir={outside / "tfds"}'],
            cwd=outside, env=env)
  assert "prepared 'synthetic_scenes'" in out
  assert any('dataset_info.json' in files
             for _, _, files in os.walk(outside / 'tfds' / 'synthetic_scenes', followlinks=True))
