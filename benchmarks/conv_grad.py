"""Kernel gradient of a stride-1 3x3 convolution on CPU: XLA's own against the per-tap matmuls
of `cen_jax.layers.conv_tap_kernel_grad`, at the shapes of RefineNet-R50 M = 2 batch 2.

  .venv/bin/python benchmarks/conv_grad.py [--shapes 4x64x64x256x256 ...] [--repeats 5]

Prints, per shape [N, H, W, C_in, C_out], the median milliseconds of the kernel gradient alone
and of the whole backward pass (input + kernel gradients) in each form, their ratio, and the
largest relative difference of the two kernel gradients.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cen_jax import host_memory  # pylint: disable=wrong-import-position

host_memory.keep_freed_host_memory()

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from cen_jax import layers  # pylint: disable=wrong-import-position

DEFAULT_SHAPES = ['4x64x64x256x256', '4x32x32x256x256', '4x16x16x256x256', '4x8x8x512x512',
                  '4x32x32x128x128', '4x64x64x256x40', '4x64x64x64x64']


def median_ms(fn, args, repeats):
  """Median milliseconds of the compiled `fn` and its (warm-up) output."""
  compiled = jax.jit(fn).lower(*args).compile()
  out = jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times), out


def backward(form, part):
  """The kernel gradient alone ('kernel'; XLA drops the unused input gradient) or both."""
  if part == 'kernel':
    return lambda x, kernel, g: jax.vjp(form, x, kernel)[1](g)[1]
  return lambda x, kernel, g: jax.vjp(form, x, kernel)[1](g)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', nargs='*', default=DEFAULT_SHAPES)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  forms = {'xla': lambda x, k: layers.conv(x, k, 1, 1),
           'taps': lambda x, k: layers.conv_tap_kernel_grad(x, k, 1)}
  print(f'jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} cpus')
  print('| [N, H, W, C_in, C_out] | kernel grad XLA (ms) | kernel grad taps (ms) | speed-up '
        '| backward XLA (ms) | backward taps (ms) | speed-up | max rel. diff |')
  print('|---|---|---|---|---|---|---|---|')
  for text in args.shapes:
    n, h, w, cin, cout = (int(v) for v in text.split('x'))
    x = jax.random.normal(jax.random.key(0), (n, h, w, cin))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) / (3 * cin ** 0.5)
    g = jax.random.normal(jax.random.key(2), (n, h, w, cout))
    row, grads = [], {}
    for part in ('kernel', 'both'):
      for name, form in forms.items():
        ms, out = median_ms(backward(form, part), (x, kernel, g), args.repeats)
        row.append(ms)
        if part == 'kernel':
          grads[name] = out
    diff = float(jnp.max(jnp.abs(grads['taps'] - grads['xla'])) / jnp.max(jnp.abs(grads['xla'])))
    print(f'| {text} | {row[0]:.1f} | {row[1]:.1f} | {row[0] / row[1]:.2f}x | {row[2]:.1f} '
          f'| {row[3]:.1f} | {row[2] / row[3]:.2f}x | {diff:.1e} |')


if __name__ == '__main__':
  main()
