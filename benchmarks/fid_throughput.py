"""FID feature throughput: pool3 features per second of the Flax FID InceptionV3 on this machine,
and FLOPs per image from XLA's cost analysis of the compiled forward.

Random weights (throughput does not depend on them). Inputs are 256x256 images in [0, 1] (the
translation crop), resized on device to 299x299 as pytorch-fid does; one row per batch size.

  .venv/bin/python benchmarks/fid_throughput.py [--batch_sizes 1 4 16] [--iters 3] [--size 256]
"""

import argparse
import os
import time

import numpy as np



def flops_per_image(compiled, batch: int) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']) / batch


def measure(variables, batch: int, size: int, iters: int):
  import jax
  from cen_jax import fid
  images = jax.device_put(np.random.default_rng(0).uniform(0, 1, (batch, size, size, 3))
                          .astype(np.float32))
  t = time.perf_counter()
  compiled = jax.jit(fid.features).lower(variables, images).compile()
  compile_s = time.perf_counter() - t
  compiled(variables, images).block_until_ready()  # warm-up
  t = time.perf_counter()
  for _ in range(iters):
    compiled(variables, images).block_until_ready()
  rate = iters * batch / (time.perf_counter() - t)
  return rate, flops_per_image(compiled, batch), compile_s


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch_sizes', type=int, nargs='+', default=[1, 4, 16])
  parser.add_argument('--iters', type=int, default=3, help='timed calls per batch size')
  parser.add_argument('--size', type=int, default=256, help='input image side (resized to 299)')
  args = parser.parse_args()

  import jax
  from cen_jax import fid
  variables = jax.device_put(fid.random_variables(seed=0))
  load = os.getloadavg()
  rows = [(b,) + measure(variables, b, args.size, args.iters) for b in args.batch_sizes]
  device = jax.devices()[0]
  print(f'\nFID InceptionV3 (pytorch-fid architecture), {args.size}x{args.size} inputs resized '
        f'to {fid.INPUT_SIZE}x{fid.INPUT_SIZE}, float32 (HIGHEST precision); '
        f'{jax.device_count()} {device.platform} device(s) ({device.device_kind}), '
        f'{os.cpu_count()} CPU cores, load average {load[0]:.1f} before timing')
  print('| batch | features/s | GFLOPs/image (XLA cost analysis) | G multiply-adds/image | '
        'compile s |')
  print('|---|---|---|---|---|')
  for batch, rate, flops, compile_s in rows:  # XLA counts a multiply-add as 2 FLOPs
    print(f'| {batch} | {rate:.2f} | {flops / 1e9:.2f} | {flops / 2e9:.2f} | {compile_s:.1f} |')


if __name__ == '__main__':
  main()
