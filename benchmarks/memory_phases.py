"""Where the cen-jax train step's host memory goes, phase by phase (issue: peak RSS).

  .venv/bin/python benchmarks/memory_phases.py --shapes 128x128 256x256

For each shape, in a fresh process: the benchmark's train step (benchmarks/train_step.py: CEN
RefineNet-LW on ResNet-50, M = 2, 40 classes, batch 2), with resident memory (VmRSS) and its
peak (VmHWM) after each phase: imports, parameter init, the optimiser state, tracing and
lowering, XLA's compile, and three steps; after each phase also what glibc gives back to the
system with malloc_trim(0) (memory freed but kept in the heap), and XLA's own buffer
assignment of the step (`compiled.memory_analysis()`: arguments, outputs aliased to the
donated state, temporaries). glibc's defaults (no host_memory settings), as the tests run.
Each phase's trim changes what follows (the next phase starts from a trimmed heap), so the
peaks here are not the train-step benchmark's; they show which phase sets the peak and what
is garbage there. `--compile_first` compiles the step from the state's shapes (jax.eval_shape)
before the parameters and the optimiser state exist, then builds them.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20


def status() -> tuple[int, int]:
  """(VmRSS, VmHWM) of this process in MiB."""
  with open('/proc/self/status') as f:
    fields = dict(line.split(':', 1) for line in f)
  return tuple(int(fields[k].split()[0]) // 1024 for k in ('VmRSS', 'VmHWM'))


def worker(size: int, compile_first: bool, remat: str) -> None:
  libc = ctypes.CDLL('libc.so.6')
  rows = []

  def phase(name):
    rss, peak = status()
    libc.malloc_trim(0)
    rows.append({'phase': name, 'rss': rss, 'peak': peak, 'after_trim': status()[0]})

  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import jax
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P
  import train_step as bench
  from cen_jax import train as train_lib
  from cen_jax.tasks import segmentation
  phase('imports')
  case = dict(mode='train', resnet=50, classes=40, branches=2, batch=2, height=size,
              width=size, lr_enc=5e-4, lr_dec=3e-3, remat=remat)
  config = bench.jax_config(case)
  model = segmentation.build(config)
  x, mask = bench.synthetic_batch(case)
  batch = {'x': x, 'mask': mask}
  step = segmentation.make_train_step(config, model, segmentation.stage_starts(config, 10 ** 6))
  mesh = Mesh(np.asarray(jax.devices()[:1]), (train_lib.AXIS,))
  mapped = jax.shard_map(step, mesh=mesh,
                         in_specs=(P(), train_lib.batch_specs(segmentation.BATCH_KEYS)),
                         out_specs=(P(), P()), check_vma=False)
  jitted = jax.jit(mapped, donate_argnums=(0,))

  def new_state():
    variables = jax.block_until_ready(
        segmentation.init_variables(config, model, jax.random.key(0)))
    phase('parameter init')
    state = jax.block_until_ready(segmentation.state_from_variables(config, variables))
    del variables
    phase('optimiser state')
    return state

  def compile_step(state):
    lowered = jitted.lower(state, batch)
    phase('trace + lower')
    compiled = lowered.compile()
    del lowered
    phase('compile')
    return compiled

  if compile_first:  # from the state's shapes alone, before any parameter exists
    compiled = compile_step(train_lib.template_state(config, model))
    state = new_state()
  else:
    state = new_state()
    compiled = compile_step(state)
  for i in range(3):
    state, _ = jax.block_until_ready(compiled(state, batch))
    phase(f'step {i + 1}')
  mem = compiled.memory_analysis()
  xla = {k: round(getattr(mem, f'{k}_size_in_bytes') / MIB) for k in
         ('argument', 'output', 'alias', 'temp')}
  print(json.dumps({'rows': rows, 'xla': xla}))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', nargs='+', default=['128x128', '256x256'])
  parser.add_argument('--compile_first', action='store_true',
                      help='compile the step from the state\'s shapes before any state exists')
  parser.add_argument('--remat', default='none', help='config.model.remat of the step')
  parser.add_argument('--worker', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.worker, args.compile_first, args.remat)
    return
  for shape in args.shapes:
    size = int(shape.split('x')[0])
    flags = (['--compile_first'] if args.compile_first else []) + [f'--remat={args.remat}']
    out = subprocess.run([sys.executable, __file__, f'--worker={size}', *flags], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout
    result = json.loads(out.strip().splitlines()[-1])
    xla = result['xla']
    order = 'compiled before the state exists' if args.compile_first else 'state, then compile'
    print(f'\n### R50, M = 2, batch 2, {shape}, remat {args.remat}, {order}: XLA buffers (MiB) arguments {xla["argument"]}, '
          f'outputs {xla["output"]} (aliased to the donated state: {xla["alias"]}), '
          f'temporaries {xla["temp"]}\n')
    print('| phase | RSS (MiB) | peak RSS so far (MiB) | RSS after malloc_trim (MiB) |')
    print('|---|---|---|---|')
    for row in result['rows']:
      print(f'| {row["phase"]} | {row["rss"]} | {row["peak"]} | {row["after_trim"]} |')


if __name__ == '__main__':
  main()
