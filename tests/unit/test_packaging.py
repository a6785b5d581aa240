"""pyproject.toml and the files the README's set-up reads agree: requirements.txt lists exactly
the runtime dependencies and the `test` extra, requirements-torch.txt the `torch` extra; the
console command and main.py reach the same entry point."""

import ast
import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def requirement_lines(name: str) -> set:
  lines = set()
  for line in open(os.path.join(ROOT, name)):
    line = line.split('#', 1)[0].strip()
    if line:
      lines.add(re.sub(r'\s+', '', line))
  return lines


def project() -> dict:
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['project']


def test_requirements_txt_is_the_runtime_dependencies_and_the_test_extra():
  p = project()
  assert requirement_lines('requirements.txt') == set(p['dependencies']) | set(
      p['optional-dependencies']['test'])


def test_requirements_torch_txt_is_the_torch_extra():
  assert requirement_lines('requirements-torch.txt') == set(
      project()['optional-dependencies']['torch'])


def test_console_command_and_main_py_run_the_same_function():
  module, _, function = project()['scripts']['cen-jax'].partition(':')
  assert (module, function) == ('cen_jax.cli', 'console')
  from cen_jax import cli
  assert callable(getattr(cli, function))
  tree = ast.parse(open(os.path.join(ROOT, 'main.py')).read())
  calls = [ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)]
  assert calls == ['cli.console']  # main.py is a thin wrapper


def test_every_package_directory_is_in_the_distribution():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    setuptools = tomllib.load(f)['tool']['setuptools']
  mapping = setuptools['package-dir']
  found = set()
  for package, folder in mapping.items():
    for directory, _, files in os.walk(os.path.join(ROOT, folder)):
      if '__init__.py' in files and '__pycache__' not in directory:
        rel = os.path.relpath(directory, os.path.join(ROOT, folder))
        found.add(package if rel == '.' else f'{package}.{rel.replace(os.sep, ".")}')
  assert set(setuptools['packages']) == found
