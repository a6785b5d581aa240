"""Start-up time of main.py, cold (empty compilation cache) and warm (a second run of the same
config and shapes, config.compile_cache_dir filled by the first).

  .venv/bin/python benchmarks/startup.py [--config configs/demo.py] [--repeats 1] \
      [--flag=--config.model.blocks='(3,4,6,3)' ...]

Every run is a fresh process (`python main.py ...`), timed from its start to its first
step or batch (the progress bar's first `1/N` line) and to its exit:
- train: max_steps = 1 (its exit includes the final evaluation and checkpoint);
- eval: `--mode eval` of that checkpoint on the eval split (its bar, drawn on a terminal: stderr
  is a pseudo-terminal here, counts finished batches);
- predict: `--mode predict` of one RGB-D pair of PNGs: one batch, no bar; its exit is the
  measure.
The dataset is prepared once before (not timed). Each mode gets its own empty cache folder for
its cold run, then runs again on it; the table gives the medians over --repeats.
"""

import argparse
import fcntl
import os
import pty
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP = re.compile(rb'\b1/\d+ \[')  # tqdm's "1/8 [" once the first step is done


def timed_main(flags) -> tuple:
  """(seconds to the first `1/N` bar line or None, seconds to exit) of `python main.py flags`.
  Its stderr is a pseudo-terminal: eval draws its bar on a terminal only."""
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), *flags]
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  terminal, child_end = pty.openpty()
  # 24 x 120: a new pty is 0 x 0, and tqdm draws nothing in 0 columns.
  fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 120, 0, 0))
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=child_end)
  os.close(child_end)
  first = []
  out = []

  def watch():  # the bar redraws with \r: read bytes as they come
    seen = b''
    while True:
      try:
        chunk = os.read(terminal, 4096)
      except OSError:  # EIO: the child closed the terminal
        break
      if not chunk:
        break
      seen += chunk
      if not first and FIRST_STEP.search(seen):
        first.append(time.perf_counter() - start)
    out.append(seen)

  reader = threading.Thread(target=watch)
  reader.start()
  stdout = proc.stdout.read()
  proc.wait()
  reader.join()
  os.close(terminal)
  if proc.returncode:
    sys.exit(f'error: {" ".join(cmd)} exited {proc.returncode}:\n'
             f'{stdout.decode()[-2000:]}{out[0].decode(errors="replace")[-2000:]}')
  return (first[0] if first else None), time.perf_counter() - start


def write_pair(folder) -> list:
  """One 64x64 RGB and depth PNG pair (smooth random content): predict's --inputs."""
  from PIL import Image
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:64, 0:64]
  rgb = np.stack([np.sin(xx / rng.uniform(4, 16) + c) * 100 + 128 for c in range(3)], 2)
  depth = 100 + yy * 2 + rng.normal(0, 3, yy.shape)
  paths = [os.path.join(folder, 'rgb.png'), os.path.join(folder, 'depth.png')]
  Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(paths[0])
  Image.fromarray(np.clip(depth, 0, 255).astype(np.uint8)).save(paths[1])
  return paths


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--repeats', type=int, default=1)
  parser.add_argument('--flag', dest='flags', action='append', default=[],
                      help='one more main.py flag for every run (a config override), as '
                      "--flag=--config.model.stem_width=64; repeat it for more")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix='cen_jax_startup_') as root:
    data = [f'--config={args.config}', f'--config.data.data_dir={root}/tfds', *args.flags]
    subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *data, '--mode=prepare'],
                   cwd=ROOT, check=True, capture_output=True)
    inputs = write_pair(root)
    rows = []
    for mode in ('train', 'eval', 'predict'):
      runs = {'cold': [], 'warm': []}
      for k in range(args.repeats):
        cache = os.path.join(root, f'xla_{mode}_{k}')
        workdir = os.path.join(root, f'run_{k}')
        flags = [*data, f'--config.compile_cache_dir={cache}', f'--workdir={workdir}']
        if mode == 'train':
          flags += ['--config.train.max_steps=1']
        else:
          flags += [f'--mode={mode}']
        if mode == 'predict':
          flags += [f'--inputs={p}' for p in inputs] + [f'--output={root}/predicted']
        for kind in ('cold', 'warm'):
          if mode == 'train':  # a finished workdir would not train again
            shutil.rmtree(workdir, ignore_errors=True)
          runs[kind].append(timed_main(flags))
      rows.append((mode, runs))
  print(f'{" ".join([args.config, *args.flags])}, {args.repeats} run(s) each, medians:\n')
  print('| mode | to first step/batch: cold / warm (s) | cold / warm | to exit: cold / warm (s) '
        '| cold / warm |')
  print('|---|---|---|---|---|')
  for mode, runs in rows:
    cells = []
    for at in (0, 1):
      times = [[t[at] for t in runs[kind]] for kind in ('cold', 'warm')]
      if any(t is None for kind in times for t in kind):
        cells += ['-', '-']
        continue
      cold, warm = (statistics.median(t) for t in times)
      cells += [f'{cold:.2f} / {warm:.2f}', f'{cold / warm:.1f}x']
    print(f'| {mode} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
