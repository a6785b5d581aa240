"""cen-jax train step (and forward pass) against the official PyTorch CEN, side by side.

  .venv/bin/python benchmarks/train_step.py \
      --official_repo /path/to/CEN --torch_python .venv-torch/bin/python

For every case a cen-jax worker process and (with --official_repo) an official PyTorch worker
process (benchmarks/official_torch_step.py, run by --torch_python) build the same network on the
same synthetic batch; the parent then alternates turns between them (ABBA order) so both
see the same machine load, and times the last of `--block` steps of each turn (steady state, as
in training: on this 2-core machine the first step after the other worker ran was up to 1.5x
slower, more so for cen-jax), and prints the medians and their ratio as one table. `--backbone
mit_b1 --official_repo /path/to/TokenFusion` times TokenFusion on MiT-B1 against the official
TokenFusion step (benchmarks/official_tokenfusion_step.py) instead. Default cases:
RefineNet-LW on ResNet-50, M = 2, 40 classes, frozen BN, two SGD groups, CE on the M + 1
outputs + L1, 128x128 and 256x256 batch 2 (train step); ResNet-101 480x640 batch 1 (forward,
eval mode). Compile time (cen-jax: lower + compile) and the first PyTorch step are reported
apart from the step times; so are the process CPU seconds per step (less sensitive than wall time
to other jobs on the machine) and each worker process's peak RSS (one process per case).
`--compare_tree` times a second cen-jax checkout (e.g. one before a change) in the same rotation;
`--compare_xla_flags` runs that second worker (this tree unless `--compare_tree`) with the given
XLA_FLAGS, to try an XLA:CPU option on the whole step.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORE_LABEL = 255


# ----------------------------------------------------------------------------- cen-jax worker

def synthetic_batch(case, seed=0):
  """The benchmark batch of both workers: x [M, N, H, W, 3], mask [N, H, W] (10% ignored)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  m, n, h, w = case['branches'], case['batch'], case['height'], case['width']
  x = rng.standard_normal((m, n, h, w, 3)).astype(np.float32)
  mask = rng.integers(0, case['classes'], (n, h, w)).astype(np.int64)
  mask[rng.random((n, h, w)) < 0.1] = IGNORE_LABEL
  return x, mask.astype(np.int32)


def jax_config(case):
  from cen_jax import config as config_lib
  if case.get('backbone', 'resnet').startswith('mit_'):
    return mit_config(case)
  config = config_lib.base_config()
  config.model.resnet = case['resnet']
  config.model.num_classes = case['classes']
  config.modalities = ('rgb', 'depth', 'extra1', 'extra2')[:case['branches']]
  config.train.batch_size = case['batch']
  config.train.lr_enc = (case['lr_enc'],) * 3
  config.train.lr_dec = (case['lr_dec'],) * 3
  config.model.remat = case.get('remat', 'none')
  return config


def mit_config(case):
  """TokenFusion on MiT: the official recipe (configs/nyudv2_tokenfusion_mit.py), with the case's
  classes, branches and batch."""
  from cen_jax.configs import nyudv2_tokenfusion_mit
  config = nyudv2_tokenfusion_mit.get_config(case['backbone'][len('mit_'):])
  config.model.num_classes = case['classes']
  config.modalities = ('rgb', 'depth', 'extra1', 'extra2')[:case['branches']]
  config.train.batch_size = case['batch']
  return config


class JaxStep:
  """One cen-jax step on one device: the runner's train step (train.Runner over a 1-device
  mesh, compiled from the state's shapes before the state exists, as main.py does) or the
  eval-mode forward pass."""

  def __init__(self, case):
    from cen_jax import host_memory
    config = jax_config(case)
    host_memory.use_async_cpu_dispatch_of(config)  # as main.py does, before any computation
    import jax
    import numpy as np
    from cen_jax import branches as branches_lib
    from cen_jax import train as train_lib
    from cen_jax.tasks import segmentation

    sys.stderr.write(f'cen-jax worker: jax {jax.__version__}, backend {jax.default_backend()}\n')
    model = segmentation.build(config)
    x, mask = synthetic_batch(case)
    self.mode = case['mode']
    start = time.perf_counter()
    if self.mode == 'train':
      config.train.parallel = 'shard_map'
      self.runner = train_lib.Runner(config, model, segmentation.stage_starts(config, 10 ** 6),
                                     devices=jax.devices()[:1])
      batch = {'mask': mask, **dict(zip(branches_lib.inputs(config), x))}
      self.runner.compile(train_lib.template_state(config, model), batch)
      self.compiled = self.runner.compiled
      self.compile_s = time.perf_counter() - start
      variables = segmentation.init_variables(config, model, jax.random.key(0))
      self.args = [self.runner.place_state(segmentation.state_from_variables(config, variables)),
                   batch]
      del variables
      host_memory.release_start_up_memory()  # as main.py does before its first step
    else:
      variables = segmentation.init_variables(config, model, jax.random.key(0))
      forward = lambda v, x: model.apply(v, x, train=False)
      self.args = [variables, x]
      self.compiled = jax.jit(forward).lower(*self.args).compile()
      self.compile_s = time.perf_counter() - start
    self.params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(
        self.args[0].params if self.mode == 'train' else self.args[0]['params']))
    mem = self.compiled.memory_analysis()
    self.xla_mib = None if mem is None else (
        mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2 ** 20
    self.xla_temp_mib = None if mem is None else mem.temp_size_in_bytes / 2 ** 20

  def __call__(self):
    import jax
    if self.mode == 'train':
      out = self.runner.step(*self.args)
      self.args[0] = out[0]  # the state was donated
    else:
      out = self.compiled(*self.args)
    jax.block_until_ready(out)


def timed(step) -> dict:
  """Wall seconds and process CPU seconds (user + system, all threads) of one step."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  step()
  seconds = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_SELF)
  cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
  return {'seconds': seconds, 'cpu_s': cpu}


def serve(make_step):
  """Answer the parent's JSON-line commands (see official_torch_step.py)."""
  step = None
  for line in sys.stdin:
    msg = json.loads(line)
    if msg['cmd'] == 'setup':
      step = make_step(msg['case'])
      start = time.perf_counter()
      step()
      reply = {'params': step.params, 'first_s': time.perf_counter() - start,
               'compile_s': step.compile_s, 'xla_mib': step.xla_mib,
               'xla_temp_mib': step.xla_temp_mib}
    elif msg['cmd'] == 'run':
      reply = timed(step)
    elif msg['cmd'] == 'memory':
      reply = {'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    else:
      return
    print(json.dumps(reply), flush=True)


def jax_worker():
  sys.path.insert(0, ROOT)
  from cen_jax import host_memory  # every tree runs its own copy of this script
  host_memory.keep_freed_host_memory()  # as main.py does, before JAX starts its threads
  serve(JaxStep)


# ----------------------------------------------------------------------------- parent

class Worker:
  def __init__(self, argv, env=None):
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, cwd=ROOT, env=env)

  def ask(self, **msg):
    self.proc.stdin.write(json.dumps(msg) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'worker {self.proc.args} exited with {self.proc.wait()}')
    return json.loads(line)

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
      self.proc.stdin.close()
    except BrokenPipeError:
      pass
    self.proc.wait()


def parse_shape(text):
  h, w = text.lower().split('x')
  return int(h), int(w)


def make_case(mode, shape, batch, resnet, branches=2, classes=40, backbone='resnet',
              remat='none'):
  """One benchmark case: the recipe both workers build (see the module docstring); remat is
  cen-jax's config.model.remat (the official step keeps every activation)."""
  height, width = parse_shape(shape)
  return dict(mode=mode, resnet=resnet, height=height, width=width, batch=batch,
              branches=branches, classes=classes, lr_enc=5e-4, lr_dec=3e-3, backbone=backbone,
              remat=remat)


def cases(args):
  common = dict(branches=args.branches, classes=args.classes)
  out = [make_case('train', shape, args.batch, args.resnet, backbone=args.backbone,
                   remat=remat, **common)
         for remat in args.remat for shape in args.shapes]
  if args.forward_shape and args.backbone == 'resnet':  # the forward row is CEN's R101
    out.append(make_case('forward', args.forward_shape, args.forward_batch, args.forward_resnet,
                         **common))
  return out


def case_name(case):
  kind = 'train step' if case['mode'] == 'train' else 'forward only'
  network = (f"TokenFusion MiT-{case['backbone'][len('mit_'):].upper()}"
             if case.get('backbone', 'resnet').startswith('mit_') else f"R{case['resnet']}")
  remat = f", remat {case['remat']}" if case.get('remat', 'none') != 'none' else ''
  return f"{kind}, {network} {case['height']}x{case['width']}, batch {case['batch']}{remat}"


def measure(case, args):
  """Median seconds over `args.processes` fresh sets of workers of `args.steps` alternated turns
  each (the last step of each turn), plus set-up figures and each set's ratios. Fresh processes,
  because one worker process can run 16% slower than another of the same code for its whole
  life (docs/benchmarks.md), which a single set would report as a difference between the trees."""
  runs = [measure_once(case, args) for _ in range(args.processes)]
  out = {}
  for k in runs[0]:
    times = [t for run in runs for t in run[k]['times']]
    cpu = [c for run in runs for c in run[k]['cpu_s']]
    out[k] = dict(runs[0][k], median_s=statistics.median(times), times=times,
                  cpu_s=statistics.median(cpu),
                  peak_rss_mib=max(run[k]['peak_rss_mib'] for run in runs),
                  process_medians=[statistics.median(run[k]['times']) for run in runs])
    if 'compile_s' in out[k]:  # the cen-jax workers
      out[k]['compile_s'] = statistics.median([run[k]['compile_s'] for run in runs])
  return out


def measure_once(case, args):
  """The step times of `args.steps` alternated turns of one fresh set of workers."""
  workers = {'jax': Worker([args.jax_python, os.path.abspath(__file__), '--worker'])}
  if args.compare_tree or args.compare_xla_flags:
    tree = os.path.abspath(args.compare_tree) if args.compare_tree else ROOT
    env = None
    if args.compare_xla_flags:
      env = dict(os.environ, XLA_FLAGS=' '.join(
          filter(None, [os.environ.get('XLA_FLAGS', ''), args.compare_xla_flags])))
    workers['jax_other'] = Worker(
        [args.jax_python, os.path.join(tree, 'benchmarks', 'train_step.py'), '--worker'], env)
  if args.official_repo:
    official = ('official_tokenfusion_step.py' if case.get('backbone', 'resnet').startswith('mit_')
                else 'official_torch_step.py')
    workers['torch'] = Worker([args.torch_python, os.path.join(ROOT, 'benchmarks', official),
                               '--official_repo', os.path.abspath(args.official_repo)])
  try:
    setup = {k: w.ask(cmd='setup', case=case) for k, w in workers.items()}  # one at a time
    times = {k: [] for k in workers}
    cpu = {k: [] for k in workers}
    order = list(workers)
    for i in range(args.warmup + args.steps):
      last = {}
      for k in (order if i % 2 == 0 else order[::-1]):  # ABBA: none always runs first
        for _ in range(args.block - 1):  # untimed: what the switch from the other worker costs
          workers[k].ask(cmd='run')
        reply = workers[k].ask(cmd='run')
        last[k] = reply['seconds']
        if i >= args.warmup:
          times[k].append(reply['seconds'])
          cpu[k].append(reply.get('cpu_s', float('nan')))
      print(f'  {case_name(case)}: step {i}: ' +
            ', '.join(f'{k} {s:.3f} s' for k, s in last.items()), file=sys.stderr, flush=True)
    memory = {k: w.ask(cmd='memory')['peak_rss_mib'] for k, w in workers.items()}
  finally:
    for w in workers.values():
      w.close()
  return {k: dict(setup[k], times=times[k], cpu_s=cpu[k], peak_rss_mib=memory[k])
          for k in workers}


def process_ratios(results, of, to):
  """'a-b' range of the per-process speed of worker `of` relative to worker `to` (their
  medians in the same set), or '' with one set."""
  ratios = [t / o for o, t in zip(results[of]['process_medians'], results[to]['process_medians'])]
  return f' ({min(ratios):.2f}-{max(ratios):.2f}x)' if len(ratios) > 1 else ''


def cpu_model() -> str:
  """The CPU's model name, family and model number (/proc/cpuinfo), as run-to-run figures on
  this kind of machine depend on which CPU it got (under KVM the name alone can be bare)."""
  fields = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    return 'unknown CPU'
  family, model = fields.get('cpu family'), fields.get('model')
  return ' '.join(filter(None, [fields.get('model name', 'unknown CPU'),
                                family and f'(family {family}, model {model})']))


def share_table(op_ms) -> str:
  """A markdown table of op time by kind ({kind: ms}) and each kind's share, largest first
  (benchmarks/profile_step.py and profile_official_step.py)."""
  total = sum(op_ms.values())
  return '\n'.join(['| kind | op time (ms) | share |', '|---|---|---|'] + [
      f'| {kind} | {ms:.0f} | {100 * ms / total:.1f}% |'
      for kind, ms in sorted(op_ms.items(), key=lambda item: -item[1])])


def table(results, compared_to=''):
  other = (f' | cen-jax {compared_to} (s) | speed-up vs it') if compared_to else ''
  rows = ['| case | official PyTorch (s) | cen-jax (s) | cen-jax speed vs official '
          '| CPU s/step official / cen-jax' + other + ' | cen-jax compile (s) '
          '| official first step (s) | peak RSS official / cen-jax (MiB) '
          '| XLA buffers: all / temporaries (MiB) |',
          '|---|---|---|---|---|' + ('---|---|' if compared_to else '') + '---|---|---|---|']
  for case, r in results:
    jax_r, torch_r, other_r = r['jax'], r.get('torch'), r.get('jax_other')
    ratio = (f"{torch_r['median_s'] / jax_r['median_s']:.2f}x" + process_ratios(r, 'jax', 'torch')
             if torch_r else '-')
    compared = [f"{other_r['median_s']:.3f}",
                f"{other_r['median_s'] / jax_r['median_s']:.2f}x" +
                process_ratios(r, 'jax', 'jax_other')] if other_r else []
    rows.append(' | '.join([
        f'| {case_name(case)}',
        f"{torch_r['median_s']:.3f}" if torch_r else '-',
        f"{jax_r['median_s']:.3f}",
        ratio,
        (f"{torch_r['cpu_s']:.1f} / " if torch_r else '- / ') + f"{jax_r['cpu_s']:.1f}",
        *compared,
        f"{jax_r['compile_s']:.1f}",
        f"{torch_r['first_s']:.2f}" if torch_r else '-',
        (f"{torch_r['peak_rss_mib']:.0f} / " if torch_r else '- / ') + f"{jax_r['peak_rss_mib']:.0f}",
        (f"{jax_r['xla_mib']:.0f} / {jax_r.get('xla_temp_mib') or 0:.0f}"
         if jax_r['xla_mib'] is not None else '-'),
    ]) + ' |')
  return '\n'.join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--official_repo', default='',
                      help='checkout or git dir of the official repository (yikaiw/CEN; with '
                      '--backbone mit_*, yikaiw/TokenFusion)')
  parser.add_argument('--torch_python', default=os.path.join(ROOT, '.venv-torch', 'bin', 'python'))
  parser.add_argument('--jax_python', default=sys.executable)
  parser.add_argument('--shapes', nargs='*', default=['128x128', '256x256'])
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--remat', nargs='+', default=['none'],
                      help="cen-jax's config.model.remat for the train rows: one row set each")
  parser.add_argument('--resnet', type=int, default=50)
  parser.add_argument('--backbone', default='resnet',
                      help="'resnet' (CEN, RefineNet-LW; --official_repo: yikaiw/CEN) or "
                      "'mit_b0'..'mit_b5' for the train-step rows (TokenFusion, SegFormer head, "
                      "AdamW; --official_repo: yikaiw/TokenFusion)")
  parser.add_argument('--branches', type=int, default=2, help='M (the official model needs 2)')
  parser.add_argument('--classes', type=int, default=40)
  parser.add_argument('--forward_shape', default='480x640', help="'' to skip")
  parser.add_argument('--forward_resnet', type=int, default=101)
  parser.add_argument('--forward_batch', type=int, default=1)
  parser.add_argument('--steps', type=int, default=5, help='timed steps per worker and case')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after the first')
  parser.add_argument('--processes', type=int, default=1,
                      help='fresh sets of workers per case; the table gives the median over '
                      'all their timed steps and, in brackets, the range of the sets\' ratios')
  parser.add_argument('--block', type=int, default=2,
                      help='steps per turn of a worker, the last one timed (steady state, as '
                      'in training: the first step after the other worker ran is slower)')
  parser.add_argument('--compare_tree', default='',
                      help='another cen-jax checkout (e.g. before a change) timed alongside')
  parser.add_argument('--compare_xla_flags', default='',
                      help='XLA_FLAGS added for the second cen-jax worker (this tree unless '
                      '--compare_tree), e.g. to try an XLA:CPU option')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return jax_worker()

  results = []
  for case in cases(args):
    results.append((case, measure(case, args)))
  first = results[0][1]
  print(f"parameters: cen-jax {first['jax']['params']:,}" +
        (f", official {first['torch']['params']:,} (torch {first['torch']['version']}, "
         f"{first['torch']['threads']} threads)" if 'torch' in first else ''))
  print(f'cpus: {os.cpu_count()} x {cpu_model()}, load average at the end: '
        f'{" ".join(f"{v:.2f}" for v in os.getloadavg())}; median of {args.steps} alternated '
        f'turns of {args.block} steps (the last timed) after {args.warmup} warm-up, in each of '
        f'{args.processes} fresh set(s) of worker processes')
  compared_to = ' '.join(filter(None, [f'at {args.compare_tree}' if args.compare_tree else '',
                                       f'with {args.compare_xla_flags}'
                                       if args.compare_xla_flags else '']))
  print(table(results, compared_to))


if __name__ == '__main__':
  main()
