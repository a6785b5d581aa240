"""Metric writing (JSONL + TensorBoard), a progress bar, and atomic JSON files.

No TensorFlow: TensorBoard event files come from tensorboardX.
"""

import json
import math
import os
import sys
from typing import Any, Mapping

import numpy as np

from cen_jax.io_utils import atomic_write


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a/b': 1}."""
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten(value, name))
    else:
      flat[name] = value
  return flat


def _to_float(value) -> float:
  # Accepts Python numbers, numpy scalars and 0-d / size-1 device arrays.
  return float(np.asarray(value).reshape(()))


def _json_default(obj):
  """Lets json.dump take numpy (and jax) scalars and arrays."""
  if isinstance(obj, np.generic):
    return obj.item()
  if hasattr(obj, '__array__'):
    return np.asarray(obj).tolist()
  raise TypeError(f'not JSON serializable: {type(obj).__name__}')


def write_json_atomic(path: str, obj, *, indent: int = 2) -> None:
  """Writes JSON atomically (temp file + os.replace; see io_utils.atomic_write)."""
  with atomic_write(path, 'w') as f:
    json.dump(obj, f, indent=indent, sort_keys=True, default=_json_default)
    f.write('\n')


METRICS_FILE = 'metrics.jsonl'


def read_metrics(workdir: str) -> list[dict]:
  """The records of <workdir>/metrics.jsonl ([] when there is none). A torn last line (a run
  killed while writing it) is skipped; a bad line anywhere else raises ValueError naming it."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split('\n')
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):  # no newline after it: the last write was cut short
        break
      raise ValueError(f'{path}:{number}: not a JSON record ({e})') from None
  return records


def truncate_metrics(workdir: str, step: int) -> None:
  """Keeps the records of <workdir>/metrics.jsonl up to `step` (a resumed run's restored step)
  and drops a torn last line, so that the steps a resumed run replays are not logged twice.
  Atomic: a crash leaves the old file or the new one."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  kept = [r for r in read_metrics(workdir) if r.get('step', 0) <= step]
  with atomic_write(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in kept)


class MetricWriter:
  """Scalars to <workdir>/metrics.jsonl and TensorBoard (<workdir>/tensorboard/).

  Only process 0 should write: with enabled=False every method does nothing and no
  file or directory is created. Non-finite values are written as JSON NaN/Infinity,
  which Python's json reads back.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    # Append: a resumed run keeps its earlier history (truncate_metrics drops what it replays).
    self._jsonl = open(os.path.join(self.workdir, METRICS_FILE), 'a')
    from tensorboardX import SummaryWriter  # imported lazily: process 0 only
    self._tb = SummaryWriter(logdir=os.path.join(self.workdir, 'tensorboard'))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    step = int(step)
    values = {k: _to_float(v) for k, v in flatten(scalars).items()}
    self._jsonl.write(json.dumps({'step': step, **values}) + '\n')
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=step)
    self._tb.flush()

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """images: {name: uint8 [H, W, 3]}."""
    if not self.enabled:
      return
    for name, image in flatten(images).items():
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'{name}: expected uint8 [H, W, 3], got {image.dtype} {image.shape}')
      self._tb.add_image(name, image, global_step=int(step), dataformats='HWC')
    self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self.enabled = False

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False


class _LineStream:
  """Turns tqdm's carriage-return redraws into whole lines for log files (non-TTY)."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> None:
    text = text.replace('\r', '').rstrip()
    if text:
      self._stream.write(text + '\n')

  def flush(self) -> None:
    self._stream.flush()


def is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


class ProgressBar:
  """tqdm bar over a known number of steps, showing rate and ETA, on stderr.

  On a terminal it redraws in place; otherwise (log files, batch jobs) it prints a full
  line after the first update and then at most every `log_interval_s` seconds, so logs stay
  readable and still show progress. enabled=False (non-zero processes) makes every method a no-op.
  """

  def __init__(self, total: int, *, initial: int = 0, enabled: bool = True,
               desc: str = 'train', unit: str = 'step', log_interval_s: float = 60.0,
               stream=None):
    self.enabled = enabled
    self._first_shown = False
    self._stream = sys.stderr if stream is None else stream
    self._tty = is_terminal(self._stream)
    self._bar = None
    if not enabled:
      return
    from tqdm import tqdm
    self._bar = tqdm(
        total=int(total), initial=int(initial), desc=desc, unit=unit,
        file=self._stream if self._tty else _LineStream(self._stream),
        mininterval=0.5 if self._tty else log_interval_s,
        # tqdm's adaptive miniters can skip the timed refresh on slow loops.
        miniters=1, dynamic_ncols=self._tty, ncols=None if self._tty else 100,
        smoothing=0.1)

  def update(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)
      if not self._first_shown:  # the first step at once: the compile is over, the rate shows
        self._bar.refresh()
      self._first_shown = True

  def set_postfix(self, **scalars) -> None:
    """A few scalars shown after the bar, e.g. set_postfix(loss=0.53)."""
    if self._bar is None:
      return
    shown = {}
    for k, v in scalars.items():
      v = _to_float(v)
      shown[k] = f'{v:.4g}' if math.isfinite(v) else str(v)
    # refresh=False: the next timed redraw shows it; avoids a line per call off-TTY.
    self._bar.set_postfix(shown, refresh=self._tty)

  def write(self, message: str) -> None:
    """Prints a message without breaking the bar."""
    if self._bar is None:
      return
    if self._tty:
      self._bar.write(message, file=self._stream)
    else:
      self._stream.write(message + '\n')
      self._stream.flush()

  @property
  def n(self) -> int:
    return 0 if self._bar is None else self._bar.n

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
    return False
