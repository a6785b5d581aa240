"""Where the cen-jax train step spends its time on this backend: one step under jax.profiler,
its XLA ops grouped by kind.

  .venv/bin/python benchmarks/profile_step.py [--shape 256x256] [--batch 2] [--top 12]
      [--backbone mit_b1]

Builds the step of benchmarks/train_step.py (same network and batch), runs it twice, traces a
third with jax.profiler (perfetto JSON under --trace_dir), maps each traced op to its
instruction in the compiled HLO and prints the op time by kind, then the largest single
kinds-and-shapes. Op times are summed over threads, so they add up to more than the step's wall
time where ops overlap; the shares are what to compare.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

from cen_jax import host_memory  # pylint: disable=wrong-import-position

host_memory.keep_freed_host_memory()

import jax  # pylint: disable=wrong-import-position

import train_step  # pylint: disable=wrong-import-position

INSTRUCTION = re.compile(r'^\s+(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\((.*)$')
COMPUTATION = re.compile(r'^(?:ENTRY )?%?(\S+) \(.*\{$')


def parse_hlo(text):
  """{computation: [instruction lines]} and {instruction name: (shape, opcode, line)}."""
  computations, instructions, current = {}, {}, None
  for line in text.splitlines():
    match = COMPUTATION.match(line)
    if match and not line.startswith(' '):
      current = computations.setdefault(match.group(1), [])
    elif current is not None and (m := INSTRUCTION.match(line)):
      current.append(line)
      instructions[m.group(1)] = (m.group(2).split('{')[0], m.group(3), line)
  return computations, instructions


def kind_of(name, computations, instructions):
  """A readable kind for a traced op: what its fusion computes."""
  if name not in instructions:
    return None
  _, opcode, line = instructions[name]
  called = re.search(r'calls=%([^,\s}]+)', line)
  body = computations.get(called.group(1), []) if opcode == 'fusion' and called else [line]
  opcodes = {INSTRUCTION.match(l).group(3) for l in body if INSTRUCTION.match(l)}
  for l in body:
    if ' convolution(' in l:
      window = re.search(r'window=\{size=([\dx]+)', l).group(1)
      if max(int(s) for s in window.split('x')) > 7:  # the window is the whole feature map
        return 'convolution: kernel gradient'
      return 'convolution: forward / input gradient'
  if 'dot' in opcodes:
    return 'matmul (1x1 convs, kernel gradients, heads)'
  if 'transpose' in opcodes or 'reverse' in opcodes:
    return 'transpose / reverse copies'
  if opcodes & {'reduce-window', 'select-and-scatter'}:
    return 'reduce-window (pools)'
  if opcodes <= {'slice', 'bitcast', 'parameter', 'copy', 'pad', 'concatenate'}:
    return 'slice / pad / copy'
  return 'elementwise, reductions, other'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', default='256x256')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--resnet', type=int, default=50)
  parser.add_argument('--backbone', default='resnet', help="or 'mit_b0'..'mit_b5' (TokenFusion)")
  parser.add_argument('--top', type=int, default=12, help='single kinds-and-shapes listed')
  parser.add_argument('--trace_dir', default='/tmp/cen_jax_profile')
  args = parser.parse_args()
  step = train_step.JaxStep(train_step.make_case('train', args.shape, args.batch, args.resnet,
                                                 backbone=args.backbone))
  step()
  step()
  start = time.perf_counter()
  step()
  untraced = time.perf_counter() - start
  run_dir = os.path.join(args.trace_dir, time.strftime('%Y%m%d-%H%M%S'))
  jax.profiler.start_trace(run_dir, create_perfetto_trace=True)
  step()
  jax.profiler.stop_trace()
  trace = sorted(glob.glob(os.path.join(run_dir, '**', 'perfetto_trace.json.gz'),
                           recursive=True))[-1]
  events = json.load(gzip.open(trace))
  events = events['traceEvents'] if isinstance(events, dict) else events
  computations, instructions = parse_hlo(step.compiled.as_text())

  by_kind, by_shape, count = collections.Counter(), collections.Counter(), collections.Counter()
  for event in events:
    if event.get('ph') != 'X':
      continue
    kind = kind_of(event['name'], computations, instructions)
    if kind is None:
      continue
    by_kind[kind] += event['dur'] / 1e3
    key = (kind, instructions[event['name']][0])
    by_shape[key] += event['dur'] / 1e3
    count[key] += 1
  total = sum(by_kind.values())
  print(f'jax {jax.__version__}, {jax.default_backend()}, '
        f'{os.cpu_count()} x {train_step.cpu_model()}; R{args.resnet} {args.shape} batch '
        f'{args.batch}, M = 2: step {untraced:.2f} s untraced; op time {total / 1e3:.2f} s; '
        f'trace {trace}')
  print(train_step.share_table(by_kind))
  print('\n| kind | output shape | ops | op time (ms) |\n|---|---|---|---|')
  for (kind, shape), ms in by_shape.most_common(args.top):
    print(f'| {kind} | {shape} | {count[kind, shape]} | {ms:.0f} |')


if __name__ == '__main__':
  main()
