"""The package's shape: imports point only down the layers the README's layout gives, with no
cycle (function-local imports and importlib.import_module included); no module is named after
a standard-library module; __init__ files only re-export; a dataset builder imports at most
cen_jax.preprocess from the library."""

import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, 'cen_jax')

# Bottom to top (README "Layout"). A module may import its own layer or any layer below.
LAYERS = [
    ('primitives', ['io_utils', 'host_memory', 'compile_cache', 'winograd', 'branches', 'config', 'fusion',
                    'fusion.ops', 'fusion.registry', 'layers', 'metrics', 'viz', 'run_log',
                    'preprocess', 'transforms', 'image_files', 'torch_io', 'tokenfusion_io',
                    'expected']),
    ('models', ['models', 'models.build', 'models.params', 'models.resnet', 'models.refinenet',
                'models.pix2pix', 'models.mit', 'models.mit_translation', 'models.segformer',
                'fid']),
    ('data', ['input_pipeline']),
    ('shared by tasks and runner', ['runtime']),
    ('tasks', ['tasks', 'tasks.by_name', 'tasks.segmentation', 'tasks.segmentation_data',
               'tasks.segmentation_predict', 'tasks.dense', 'tasks.dense_data',
               'tasks.translation', 'tasks.translation_data']),
    ('runner', ['checkpoints', 'train']),
    ('command line', ['cli', 'ablate', 'analysis']),
]
LAYER = {f'cen_jax.{m}': i for i, (_, members) in enumerate(LAYERS) for m in members}
LAYER['cen_jax'] = 0


def package_modules() -> dict:
  """{module name: path} of every .py file under cen_jax/."""
  out = {}
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        module = os.path.relpath(path[:-3], ROOT).replace(os.sep, '.')
        out[module[:-len('.__init__')] if module.endswith('.__init__') else module] = path
  return out


MODULES = package_modules()


def _resolve(name: str) -> str | None:
  """The cen_jax module `name` refers to (a module, or the package a name lives in)."""
  while name and name not in MODULES:
    name = name.rpartition('.')[0]
  return name or None


def imports_of(module: str) -> set:
  """Every cen_jax module `module` imports: top-level and function-local `import` and
  `from ... import`, relative ones, and importlib.import_module of a constant or f-string
  prefix (all modules under that prefix)."""
  path = MODULES[module]
  tree = ast.parse(open(path).read(), path)
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.split('.')[0] == 'cen_jax')
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parts + ([node.module] if node.module else []))
      if base.split('.')[0] == 'cen_jax':
        found.update(f'{base}.{a.name}' if f'{base}.{a.name}' in MODULES else base
                     for a in node.names)
    elif (isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'import_module'
          and node.args):
      arg = node.args[0]
      if isinstance(arg, ast.Constant):
        prefix = str(arg.value)
      elif isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant):
        prefix = str(arg.values[0].value)
      else:
        continue
      if prefix.startswith('cen_jax.'):
        found.update(m for m in MODULES if m.startswith(prefix) and m != prefix.rstrip('.'))
  resolved = {_resolve(n) for n in found if n.startswith('cen_jax')}
  return {m for m in resolved if m and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
  assert sorted(set(MODULES) - set(LAYER)) == []


def test_imports_point_only_down():
  upward = [f'{a} ({LAYERS[LAYER[a]][0]}) imports {b} ({LAYERS[LAYER[b]][0]})'
            for a, deps in GRAPH.items() for b in deps if LAYER[b] > LAYER[a]]
  assert upward == []


def test_no_import_cycle():
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = 'open'
    for dep in sorted(GRAPH[node]):
      if state.get(dep) == 'open':
        cycles.append(' -> '.join(stack[stack.index(dep):] + [dep]))
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = 'done'

  for module in sorted(GRAPH):
    if module not in state:
      visit(module, [module])
  assert cycles == []


def test_the_checker_sees_function_local_and_importlib_imports():
  assert 'cen_jax.tasks.segmentation' in GRAPH['cen_jax.tasks.by_name']  # importlib f-string
  local = [m for m, p in MODULES.items()
           if any(isinstance(n, ast.ImportFrom) and n.col_offset > 0
                  for n in ast.walk(ast.parse(open(p).read())))]
  assert local, 'expected some function-local imports to be parsed'


def test_the_data_layer_and_tasks_do_not_import_upwards_by_name():
  assert not {m for m in GRAPH['cen_jax.input_pipeline'] if m.startswith('cen_jax.tasks')}
  for task in (m for m in MODULES if m.startswith('cen_jax.tasks')):
    assert not GRAPH[task] & {'cen_jax.train', 'cen_jax.checkpoints', 'cen_jax.cli'}, task


def test_no_module_named_after_the_standard_library():
  clashes = [m for m in MODULES if m.rpartition('.')[2] in sys.stdlib_module_names]
  assert clashes == []


@pytest.mark.parametrize('module', sorted(m for m, p in MODULES.items()
                                           if p.endswith('__init__.py')))
def test_init_files_only_re_export(module):
  tree = ast.parse(open(MODULES[module]).read())
  kinds = {type(n).__name__ for n in tree.body
           if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))}
  assert kinds <= {'Import', 'ImportFrom', 'Assign'}, kinds
  for node in tree.body:
    if isinstance(node, ast.Assign):
      assert [t.id for t in node.targets] == ['__all__']


def test_dataset_builders_import_only_the_preprocessing_module():
  for directory, _, files in os.walk(os.path.join(ROOT, 'data')):
    for name in (f for f in files if f.endswith('.py')):
      path = os.path.join(directory, name)
      imported = set()
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
          imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
          imported.update(f'{node.module}.{a.name}' for a in node.names)
      ours = {n for n in imported if n.split('.')[0] in ('cen_jax', 'data')}
      assert ours <= {'cen_jax.preprocess'}, (path, ours)
