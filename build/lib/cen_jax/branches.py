"""Branches as (input domain -> output task) pairs: the TPAMI scenarios as configurations.

Every scenario is the same branch-stacked network: branch m reads one input domain, owns the
head of one task, shares every convolution with the other branches and keeps its private norms;
channels are exchanged among all branches (the mean of the others, `fusion.exchange`), and the
sparsity partition splits each norm's channels into M parts (`fusion.partition_bounds`).
`config.branches` lists the branches as 'input>task' strings (cen_jax/tasks/dense.py):

  multimodal fusion      ('rgb>semseg', 'depth>semseg', 'normals>semseg')   M inputs, one task
  multitask              ('rgb>semseg', 'rgb>depth', 'rgb>normals')         one input, T tasks
  multimodal multitask   ('rgb>semseg', 'depth>semseg', 'rgb>normals', 'depth>normals')
  cycle fusion           `cycle(domains)`: branch m reads domain m, predicts domain m + 1 mod M

A task with several branches also gets the learned late ensemble of them (as CEN's).
Configs without `config.branches` (the segmentation and translation tasks) have one branch per
modality, all predicting the task's single target.
"""

import dataclasses

SEPARATOR = '>'


@dataclasses.dataclass(frozen=True)
class Branch:
  input: str  # the domain the branch reads (a feature of the dataset)
  task: str  # the output it predicts (its head and loss)

  @property
  def name(self) -> str:
    return f'{self.input}{SEPARATOR}{self.task}'


def parse(spec, *, key: str = 'config.branches') -> list[Branch]:
  """['input>task', ...] -> [Branch]; one-line ValueError naming the bad entry."""
  if isinstance(spec, str):
    spec = [spec]
  out = []
  for entry in spec:
    parts = str(entry).split(SEPARATOR)
    if len(parts) != 2 or not all(p.strip() for p in parts):
      raise ValueError(f'{key}: {entry!r} is not "input{SEPARATOR}task"')
    out.append(Branch(parts[0].strip(), parts[1].strip()))
  if not out:
    raise ValueError(f'{key} is empty: expected at least one "input{SEPARATOR}task" branch')
  names = [b.name for b in out]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f'{key}: branch {duplicates[0]!r} is listed twice')
  return out


def of_config(config) -> list[Branch]:
  """The config's branches: `config.branches`, or one per modality predicting the task's
  target ('semseg' for segmentation, config.data.target for translation)."""
  spec = config.get('branches', ())
  if spec:
    return parse(spec)
  if config.get('task', 'segmentation') == 'translation':
    target = config.data.target
  else:
    target = 'semseg'
  return [Branch(m, target) for m in config.modalities]


def check_inputs(config) -> None:
  """Every branch reads one of config.modalities (the domains the pipeline loads)."""
  for b in of_config(config):
    if b.input not in config.modalities:
      raise ValueError(f'config.branches: {b.name!r} reads {b.input!r}, which is not in '
                       f'config.modalities={list(config.modalities)} (the inputs to load)')


def inputs(config) -> list[str]:
  """The input domain of every branch, in branch order (stacked into x[m])."""
  return [b.input for b in of_config(config)]


def unique(items) -> list:
  return list(dict.fromkeys(items))


def tasks(branches) -> list[str]:
  """The tasks, in order of first appearance."""
  return unique(b.task for b in branches)


def task_branches(branches, task: str) -> list[int]:
  """Indices of the branches that predict `task`."""
  return [m for m, b in enumerate(branches) if b.task == task]


def cycle(domains) -> tuple:
  """Cycle multimodal fusion: branch m reads domains[m] and predicts domains[(m + 1) % M]."""
  domains = list(domains)
  if len(domains) < 2:
    raise ValueError(f'cycle fusion needs at least two domains, got {domains}')
  return tuple(f'{d}{SEPARATOR}{domains[(m + 1) % len(domains)]}'
               for m, d in enumerate(domains))


def graph(branches, *, exchanges: bool, losses=None) -> list[dict]:
  """Which input each branch reads, which head and loss it gets and which branches it
  exchanges channels with (every other branch when the fusion exchanges, none otherwise)."""
  names = [b.name for b in branches]
  return [{'branch': b.name, 'reads': b.input, 'task': b.task,
           'loss': (losses or {}).get(b.task, ''),
           'exchanges_with': [n for n in names if n != b.name] if exchanges else []}
          for b in branches]
