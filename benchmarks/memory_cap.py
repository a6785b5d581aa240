"""The largest train batch that fits a memory cap, for each config.model.remat policy.

  sudo .venv/bin/python benchmarks/memory_cap.py --cap_mib 6144 --shape 128x128

The benchmark's train step (benchmarks/train_step.py: CEN RefineNet-LW on ResNet-50, M = 2, 40
classes, fp32, glibc settings as main.py's) in fresh processes, each run inside a cgroup-v1
memory cgroup whose limit is the cap (the kernel kills a process that goes over it: that batch
does not fit). For every policy the batch is doubled from --start_batch until a run is killed,
then bisected to the largest batch that trains --steps steps. Prints, per policy, that batch,
its peak RSS, and at --start_batch side by side: XLA's temporaries, peak RSS, compile time and
the median step time (with its ratio to 'none', the cost of recomputing). Needs root (the
cgroup) and /sys/fs/cgroup/memory.
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
CGROUP_ROOT = '/sys/fs/cgroup/memory'
MIB = 2 ** 20
POLICIES = ('none', 'keep_convs', 'blocks')


def child(case: dict, steps: int, cgroup: str) -> None:
  """Join the cgroup, build the step and train `steps` steps; print one JSON line."""
  if cgroup:
    with open(os.path.join(cgroup, 'cgroup.procs'), 'w') as f:
      f.write(str(os.getpid()))
  from cen_jax import host_memory
  host_memory.keep_freed_host_memory()  # as main.py does, before JAX starts its threads
  import train_step as bench
  step = bench.JaxStep(case)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  print(json.dumps({'compile_s': step.compile_s, 'xla_temp_mib': step.xla_temp_mib,
                    'step_s': statistics.median(times[1:] or times),
                    'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


class Cgroup:
  """A cgroup-v1 memory cgroup limited to `cap_mib` (no swap beyond it)."""

  def __init__(self, cap_mib: int):
    if not os.path.isdir(CGROUP_ROOT):
      raise SystemExit(f'{CGROUP_ROOT}: no cgroup-v1 memory controller on this machine')
    self.path = os.path.join(CGROUP_ROOT, f'cen_jax_memory_cap_{os.getpid()}')
    try:
      os.makedirs(self.path, exist_ok=True)
    except PermissionError:
      raise SystemExit(f'{self.path}: cannot create a cgroup (run as root)') from None
    self._write('memory.limit_in_bytes', cap_mib * MIB)
    if os.path.exists(os.path.join(self.path, 'memory.memsw.limit_in_bytes')):
      self._write('memory.memsw.limit_in_bytes', cap_mib * MIB)

  def _write(self, name, value):
    with open(os.path.join(self.path, name), 'w') as f:
      f.write(str(value))

  def close(self):
    os.rmdir(self.path)


def run(case: dict, steps: int, cgroup: str) -> dict | None:
  """The child's figures, or None when it was killed (did not fit)."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', json.dumps(case),
                         f'--steps={steps}', f'--cgroup={cgroup}'],
                        capture_output=True, text=True, cwd=ROOT)
  if proc.returncode != 0:
    tail = proc.stderr.strip().splitlines()[-1:] or ['']
    print(f'  {case["remat"]} batch {case["batch"]}: exit {proc.returncode} {tail[0][:120]}',
          file=sys.stderr)
    return None
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f'  {case["remat"]} batch {case["batch"]}: fits, peak RSS '
        f'{result["peak_rss_mib"]:.0f} MiB', file=sys.stderr)
  return result


def largest_batch(case: dict, start: int, steps: int, cgroup: str):
  """(largest batch that fits, its figures): doubling from `start`, then bisection."""
  fits, fails, best = 0, None, None
  batch = start
  while fails is None:
    result = run(dict(case, batch=batch), steps, cgroup)
    if result is None:
      fails = batch
    else:
      fits, best, batch = batch, result, batch * 2
  while fails - fits > 1:
    batch = (fits + fails) // 2
    result = run(dict(case, batch=batch), steps, cgroup)
    if result is None:
      fails = batch
    else:
      fits, best = batch, result
  return fits, best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cap_mib', type=int, default=6144)
  parser.add_argument('--shape', default='128x128')
  parser.add_argument('--start_batch', type=int, default=2)
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--policies', nargs='+', default=list(POLICIES))
  parser.add_argument('--child', help=argparse.SUPPRESS)
  parser.add_argument('--cgroup', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import train_step as bench
  if args.child:
    child(json.loads(args.child), args.steps, args.cgroup)
    return
  cases = {policy: dict(bench.make_case('train', args.shape, args.start_batch, 50), remat=policy)
           for policy in args.policies}
  # At --start_batch, uncapped, side by side.
  reference = {policy: run(case, max(args.steps, 3), '') for policy, case in cases.items()}
  cgroup = Cgroup(args.cap_mib)
  try:
    capped = {policy: largest_batch(case, args.start_batch, args.steps, cgroup.path)
              for policy, case in cases.items()}
  finally:
    cgroup.close()
  base = reference[args.policies[0]]
  print(f'\nR50, M = 2, {args.shape}, fp32; cap {args.cap_mib} MiB (cgroup); figures at batch '
        f'{args.start_batch} uncapped, ratio against {args.policies[0]!r}\n')
  print(f'| config.model.remat | largest batch under the cap | its peak RSS (MiB) | '
        f'batch {args.start_batch}: XLA temporaries (MiB) | peak RSS (MiB) | compile (s) | '
        f'step (s) | step vs {args.policies[0]} |')
  print('|---|---|---|---|---|---|---|---|')
  for policy in args.policies:
    fits, best = capped[policy]
    ref = reference[policy]
    peak = f'{best["peak_rss_mib"]:.0f}' if best else '–'
    print(f'| {policy} | {fits or "none fits"} | {peak} | {ref["xla_temp_mib"]:.0f} | '
          f'{ref["peak_rss_mib"]:.0f} | {ref["compile_s"]:.1f} | {ref["step_s"]:.3f} | '
          f'{ref["step_s"] / base["step_s"]:.2f}x |')


if __name__ == '__main__':
  main()
