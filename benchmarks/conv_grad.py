"""The CPU forms of a stride-1 3x3 convolution against XLA's own, at the shapes of RefineNet-R50
M = 2 batch 2: the kernel gradient by matmuls (`cen_jax.layers.conv_matmul_kernel_grad`: per
tap, shifted cotangent or Winograd, cen_jax/winograd.py) and im2col
(`cen_jax.layers.conv_im2col`).

  .venv/bin/python benchmarks/conv_grad.py [--shapes 4x64x64x256x256 ...] [--repeats 5] \
      [--torch_python .venv-torch/bin/python]

Prints, per shape [N, H, W, C_in, C_out], the median milliseconds of the kernel gradient alone
and of the whole backward pass (input + kernel gradients) with XLA's and the matmul kernel
gradient, their ratio, and the largest relative difference of the two kernel gradients; then
every matmul form of the kernel gradient alone and the one the step takes; then the
forward and forward + backward of XLA's convolution against im2col. With --torch_python, a
last table puts the layer as the step builds it (`layers.fastest_conv`) next to PyTorch's
(torch.nn.functional.conv2d, NCHW, as many threads as CPUs), measured in the same run: the
forward pass, each gradient alone, and the forward pass with both gradients.
"""

import argparse
import json
import os
import statistics
import subprocess
import time


from cen_jax import host_memory  # pylint: disable=wrong-import-position

host_memory.keep_freed_host_memory()

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from cen_jax import layers  # pylint: disable=wrong-import-position

DEFAULT_SHAPES = ['4x64x64x256x256', '4x32x32x256x256', '4x16x16x256x256', '4x8x8x512x512',
                  '4x32x32x128x128', '4x64x64x256x40', '4x64x64x64x64', '4x8x8x256x256',
                  '4x4x4x512x512']


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


def layer_inputs(text):
  """x [N, H, W, C_in], a 3x3 kernel and the cotangent g of shape 'NxHxWxC_inxC_out'."""
  n, h, w, cin, cout = (int(v) for v in text.split('x'))
  x = jax.random.normal(jax.random.key(0), (n, h, w, cin))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) / (3 * cin ** 0.5)
  g = jax.random.normal(jax.random.key(2), (n, h, w, cout))
  return x, kernel, g


def forward_backward(form):
  """The output and both gradients: returning the output keeps XLA from dropping the forward
  pass (a convolution's gradients do not need it)."""
  def run(x, kernel, g):
    y, vjp = jax.vjp(form, x, kernel)
    return y, vjp(g)
  return run


def backward(form, part):
  """The kernel gradient alone ('kernel'), the input gradient alone ('input'; XLA drops the
  unused one) or both ('both')."""
  if part == 'kernel':
    return lambda x, kernel, g: jax.vjp(form, x, kernel)[1](g)[1]
  if part == 'input':
    return lambda x, kernel, g: jax.vjp(form, x, kernel)[1](g)[0]
  return lambda x, kernel, g: jax.vjp(form, x, kernel)[1](g)


TORCH_LAYER = r"""
import json, os, statistics, sys, time
import torch
torch.set_num_threads(os.cpu_count())
n, h, w, cin, cout, repeats = (int(v) for v in sys.argv[1:])
x = torch.randn(n, cin, h, w, requires_grad=True)
kernel = (torch.randn(cout, cin, 3, 3) / (3 * cin ** 0.5)).requires_grad_()
g = torch.randn(n, cout, h, w)
def forward():
  with torch.no_grad():
    torch.nn.functional.conv2d(x, kernel, padding=1)
def forward_backward():
  torch.autograd.grad(torch.nn.functional.conv2d(x, kernel, padding=1), (x, kernel), g)
def gradient(mask):  # one gradient alone, as autograd computes it (oneDNN's backward kernels)
  return lambda: torch.ops.aten.convolution_backward(
      g, x.detach(), kernel.detach(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)
out = {}
for name, fn in (('forward', forward), ('input', gradient([True, False, False])),
                 ('kernel', gradient([False, True, False])),
                 ('forward_backward', forward_backward)):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
  out[name] = 1e3 * statistics.median(times)
print(json.dumps(out))
"""


def torch_layer_ms(torch_python, shape, repeats):
  """PyTorch's milliseconds of one layer (a subprocess): forward, each gradient alone, and
  forward + backward."""
  proc = subprocess.run([torch_python, '-c', TORCH_LAYER, *map(str, shape), str(repeats)],
                        capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def layer_table(shapes, repeats, torch_python):
  """cen-jax's layer (as the train step builds it) against PyTorch's, forward and backward."""
  print('\n| [N, H, W, C_in, C_out] | forward cen-jax / torch (ms) | input grad cen-jax / torch '
        '(ms) | kernel grad cen-jax / torch (ms) | fwd + bwd cen-jax / torch (ms) '
        '| fwd + bwd cen-jax vs torch |')
  print('|---|---|---|---|---|---|')
  for text in shapes:
    x, kernel, g = layer_inputs(text)
    form = lambda x, k: layers.fastest_conv(x, k, 1, 1)
    ours = {'forward': median_ms(lambda x, k, g: form(x, k), (x, kernel, g), repeats)[0],
            'forward_backward': median_ms(forward_backward(form), (x, kernel, g), repeats)[0]}
    for part in ('input', 'kernel'):
      ours[part] = median_ms(backward(form, part), (x, kernel, g), repeats)[0]
    theirs = torch_layer_ms(torch_python, text.split('x'), repeats)
    cells = ' | '.join(f'{ours[k]:.1f} / {theirs[k]:.1f}'
                       for k in ('forward', 'input', 'kernel', 'forward_backward'))
    print(f'| {text} | {cells} | {theirs["forward_backward"] / ours["forward_backward"]:.2f}x |')


def im2col_table(shapes, repeats):
  """XLA's convolution against im2col, forward and forward + backward."""
  forms = {'xla': lambda x, k: layers.conv(x, k, 1, 1),
           'im2col': lambda x, k: layers.conv_im2col(x, k, 1, 1)}
  print('\n| [N, H, W, C_in, C_out] | forward XLA (ms) | forward im2col (ms) | speed-up '
        '| fwd + bwd XLA (ms) | fwd + bwd im2col (ms) | speed-up | im2col in the step |')
  print('|---|---|---|---|---|---|---|---|')
  for text in shapes:
    x, kernel, g = layer_inputs(text)
    forward = [median_ms(lambda x, k, g, f=f: f(x, k), (x, kernel, g), repeats)[0]
               for f in forms.values()]
    both = [median_ms(forward_backward(f), (x, kernel, g), repeats)[0] for f in forms.values()]
    used = layers.use_im2col(x.shape, 3, 1, 1)
    print(f'| {text} | {forward[0]:.1f} | {forward[1]:.1f} | {forward[0] / forward[1]:.2f}x '
          f'| {both[0]:.1f} | {both[1]:.1f} | {both[0] / both[1]:.2f}x | {"yes" if used else "no"} |')


def kernel_grad_forms_table(shapes, repeats):
  """Every matmul form of the kernel gradient of a 3x3 padding-1 conv on every shape, against
  XLA's, and the one `layers.conv_matmul_kernel_grad` takes ('-': XLA's own is used)."""
  print('\n| [N, H, W, C_in, C_out] | XLA (ms) | ' + ' | '.join(f'{name} (ms)' for name in
                                                              layers.MATMUL_KERNEL_GRAD_FORMS)
        + ' | taken in the step |')
  print('|---' * (len(layers.MATMUL_KERNEL_GRAD_FORMS) + 3) + '|')
  for text in shapes:
    x, kernel, g = layer_inputs(text)
    cin = kernel.shape[2]
    cells = [median_ms(backward(lambda x, k: layers.conv(x, k, 1, 1), 'kernel'), (x, kernel, g),
                       repeats)[0]]
    for form in layers.MATMUL_KERNEL_GRAD_FORMS:
      run = lambda x, g, form=form: layers.matmul_kernel_grad(x, g, (3, 3), 1, form)
      cells.append(median_ms(run, (x, g), repeats)[0])
    if layers.use_im2col(x.shape, 3, 1, 1):
      taken = 'im2col'
    elif not layers.use_matmul_kernel_grad(cin):
      taken = '-'
    else:
      taken = layers.matmul_kernel_grad_form(kernel.shape)
    print(f'| {text} | ' + ' | '.join(f'{ms:.1f}' for ms in cells) + f' | {taken} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shapes', nargs='*', default=DEFAULT_SHAPES)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--torch_python', default=None,
                      help='a Python with torch: adds the layer table against PyTorch')
  args = parser.parse_args()
  forms = {'xla': lambda x, k: layers.conv(x, k, 1, 1),
           'matmul': lambda x, k: layers.conv_matmul_kernel_grad(x, k, 1)}
  print(f'jax {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} cpus')
  print('| [N, H, W, C_in, C_out] | kernel grad XLA (ms) | kernel grad matmul (ms) | speed-up '
        '| backward XLA (ms) | backward matmul (ms) | speed-up | max rel. diff |')
  print('|---|---|---|---|---|---|---|---|')
  for text in args.shapes:
    x, kernel, g = layer_inputs(text)
    row, grads = [], {}
    for part in ('kernel', 'both'):
      for name, form in forms.items():
        ms, out = median_ms(backward(form, part), (x, kernel, g), args.repeats)
        row.append(ms)
        if part == 'kernel':
          grads[name] = out
    diff = float(jnp.max(jnp.abs(grads['matmul'] - grads['xla'])) / jnp.max(jnp.abs(grads['xla'])))
    print(f'| {text} | {row[0]:.1f} | {row[1]:.1f} | {row[0] / row[1]:.2f}x | {row[2]:.1f} '
          f'| {row[3]:.1f} | {row[2] / row[3]:.2f}x | {diff:.1e} |')
  kernel_grad_forms_table(args.shapes, args.repeats)
  im2col_table(args.shapes, args.repeats)
  if args.torch_python:
    layer_table(args.shapes, args.repeats, args.torch_python)


if __name__ == '__main__':
  main()
