"""The task module a config names (`config.task`)."""

import importlib

TASKS = ('segmentation', 'translation', 'dense')


def get(config):
  """The task module named by `config.task` ('segmentation' when the config has no task key)."""
  name = config.get('task', 'segmentation')
  if name not in TASKS:
    raise ValueError(f'config.task={name!r}: expected one of {", ".join(TASKS)}')
  return importlib.import_module(f'cen_jax.tasks.{name}')
