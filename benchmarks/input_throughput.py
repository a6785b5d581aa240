"""Training input throughput: augmented crop_size x crop_size examples per second.

Writes a fake NYUDv2 manual dir (640x480 rgb + 16-bit depth, 624x468 masks, as in the official
data whose inputs are centre-cropped to the mask), prepares it with the nyudv2 TFDS builder in a
temporary directory and times `input_pipeline.train_iterator` with 0 workers (augmentation in one
background thread of the main process) and with N grain worker processes.

  .venv/bin/python benchmarks/input_throughput.py [--workers 2] [--examples 36] [--batches 12]
"""

import argparse
import os
import tempfile
import time

import numpy as np



def write_fake_nyudv2(root, count, seed=0):
  from PIL import Image
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:480, 0:640]
  os.makedirs(os.path.join(root, 'rgb'))
  os.makedirs(os.path.join(root, 'depth'))
  os.makedirs(os.path.join(root, 'masks'))
  lines = []
  for i in range(count):
    # Smooth content plus noise, roughly as compressible as real photos.
    base = (np.sin(xx / rng.uniform(20, 80)) + np.cos(yy / rng.uniform(20, 80))) * 60 + 128
    rgb = np.stack([base + rng.normal(0, 8, base.shape) for _ in range(3)], 2)
    rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    depth = (5000 + 10000 * (yy / 480) + rng.normal(0, 30, yy.shape)).astype(np.uint16)
    mask = ((xx[6:-6, 8:-8] // 40 + yy[6:-6, 8:-8] // 40 + i) % 40).astype(np.uint8)
    name = f'{i:06d}.png'
    Image.fromarray(rgb).save(os.path.join(root, 'rgb', name))
    Image.fromarray(depth).save(os.path.join(root, 'depth', name))
    Image.fromarray(mask).save(os.path.join(root, 'masks', name))
    lines.append(f'rgb/{name}\tmasks/{name}\tdepth/{name}')
  for list_name in ('train.txt', 'test.txt'):
    with open(os.path.join(root, list_name), 'w') as f:
      f.write('\n'.join(lines) + '\n')


def measure(config, num_workers, batches, warmup=2):
  from cen_jax import input_pipeline, tasks
  config = config.copy_and_resolve_references()
  config.data.num_workers = num_workers
  it = input_pipeline.train_iterator(config, tasks.get(config).train_sample(config), seed=0)
  try:
    for _ in range(warmup):  # worker start-up, imports, first decodes
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    elapsed = time.perf_counter() - start
  finally:
    it.close()
  return batches * config.train.batch_size / elapsed


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workers', type=int, default=2, help='grain worker processes')
  parser.add_argument('--examples', type=int, default=36, help='fake training images')
  parser.add_argument('--batches', type=int, default=12, help='timed batches per setting')
  parser.add_argument('--batch_size', type=int, default=6)
  parser.add_argument('--crop_size', type=int, default=500)
  args = parser.parse_args()

  from cen_jax import config as config_lib
  from cen_jax import input_pipeline
  with tempfile.TemporaryDirectory() as tmp:
    config = config_lib.base_config()
    config.data.name = 'nyudv2'
    config.data.manual_dir = os.path.join(tmp, 'manual')
    config.data.data_dir = os.path.join(tmp, 'tfds')
    config.data.crop_size = args.crop_size
    config.train.batch_size = args.batch_size
    t = time.perf_counter()
    write_fake_nyudv2(config.data.manual_dir, args.examples)
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    input_pipeline.prepare(config)
    t_prepare = time.perf_counter() - t
    load = os.getloadavg()
    rows = [(0, measure(config, 0, args.batches))]
    if args.workers > 0:
      rows.append((args.workers, measure(config, args.workers, args.batches)))
  print(f'\nfake NYUDv2: {args.examples} images 640x480 (masks 624x468); wrote manual dir in '
        f'{t_write:.1f}s, prepared in {t_prepare:.1f}s; {os.cpu_count()} CPU cores, load '
        f'average {load[0]:.1f} before timing (other processes compete for the cores)')
  print(f'augmented {args.crop_size}x{args.crop_size} training examples per second '
        f'(batch {args.batch_size}, {args.batches} timed batches after 2 warm-up):')
  print('| workers | examples/s |')
  print('|---|---|')
  for workers, rate in rows:
    label = '0 (in-process, 1 thread)' if workers == 0 else str(workers)
    print(f'| {label} | {rate:.1f} |')


if __name__ == '__main__':
  main()
