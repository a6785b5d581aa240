"""Where the official PyTorch CEN train step spends its time on this CPU: one step under
torch.profiler, its aten ops grouped by kind, the counterpart of benchmarks/profile_step.py.

  .venv-torch/bin/python benchmarks/profile_official_step.py --official_repo PATH_TO_CEN \
      [--shape 256x256] [--batch 2] [--top 12]

Builds the official step of benchmarks/official_torch_step.py (same network, recipe and batch as
benchmarks/train_step.py), runs it twice, times a third and traces a fourth. Times are each op's
self CPU time as torch.profiler reports it: the wall time of the op on the thread that called
it (torch runs an op's own work on its intra-op threads), so they add up to about the step's
wall time. cen-jax's profile sums op time over threads instead: compare the shares, not the
milliseconds.
"""

import argparse
import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import official_torch_step  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
import train_step  # pylint: disable=wrong-import-position  (stdlib and numpy only)

KINDS = (  # (kind, aten op names), first match wins
    ('convolution: backward (input + kernel gradients)', ('aten::convolution_backward',)),
    ('convolution: forward', ('aten::mkldnn_convolution', 'aten::_convolution',
                              'aten::convolution')),
    ('max-pool (forward and backward)', ('aten::max_pool2d_with_indices',
                                         'aten::max_pool2d_with_indices_backward')),
    ('matmul', ('aten::mm', 'aten::addmm', 'aten::bmm')),
)


def kind_of(name: str) -> str:
  for kind, names in KINDS:
    if name in names:
      return kind
  return 'elementwise, reductions, other'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--official_repo', required=True,
                      help='checkout or git dir of the official CEN repository (yikaiw/CEN)')
  parser.add_argument('--shape', default='256x256')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--resnet', type=int, default=50)
  parser.add_argument('--top', type=int, default=12, help='single ops-and-shapes listed')
  args = parser.parse_args()

  case = train_step.make_case('train', args.shape, args.batch, args.resnet)
  with tempfile.TemporaryDirectory() as tmp:
    step = official_torch_step.OfficialStep(
        official_torch_step.extract_official(args.official_repo, tmp), case)
    step()
    step()
    start = time.perf_counter()
    step()
    untraced = time.perf_counter() - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
      step()

  by_kind = collections.Counter()
  for event in prof.key_averages():
    by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e3
  by_shape = sorted(prof.key_averages(group_by_input_shape=True),
                    key=lambda e: -e.self_cpu_time_total)[:args.top]
  total = sum(by_kind.values())
  print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; R{args.resnet} '
        f'{args.shape} batch {args.batch}, M = 2 (the official model runs each branch on its '
        f'own batch): step {untraced:.2f} s untraced; op time {total / 1e3:.2f} s')
  print(train_step.share_table(by_kind))
  print('\n| op | input shapes | calls | op time (ms) |\n|---|---|---|---|')
  for event in by_shape:
    shapes = ', '.join(str(s) for s in event.input_shapes if s)
    print(f'| {event.key} | {shapes} | {event.count} | {event.self_cpu_time_total / 1e3:.0f} |')


if __name__ == '__main__':
  main()
