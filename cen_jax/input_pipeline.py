"""Data: TFDS builders (data/, installed as cen_jax.datasets) read through grain. Task-agnostic:
a task hands the iterators its sample functions (cen_jax/tasks/*_data.py), built from the
official CEN transforms (cen_jax/transforms.py).

No TensorFlow: datasets are prepared as array_record files by the TFDS builders under data/ and
read with `tfds.builder_from_directory(...).as_data_source(split)`.

Public API
  prepare(config, *, force=False) -> str      build the dataset once (atomically); its directory
  prepared_dir(config) -> str                 where the prepared dataset lives / will live
  num_examples(config, split) -> int          examples in a split (prepares if needed)
  num_classes(config) -> int                  the dataset's class count (builder NUM_CLASSES)
  align_mode(config) -> 'crop' | 'resize'     the dataset's official alignment to the mask
  train_iterator(config, sample, *, seed, process_index=0, process_count=1) -> TrainIterator
                                              endless, checkpointable, host-local train batches;
                                              sample(stored example, rng) -> example
    TrainIterator: __next__, get_state() -> JSON dict, set_state(state), close(),
                   steps_per_epoch
  eval_iterator(config, split, sample, *, batch_size, process_index=0, process_count=1,
                one_shape=False)              full-image batches grouped by shape, padded;
                                              sample(stored example) -> example, sample.fill
                                              the padding values
  eval_batches(shapes, batch_size, process_index=0, process_count=1) -> [[index]]
                                              the eval batching/sharding plan
  builder_module(name, builder_dir='')        data/<name>/<name>_dataset_builder (NUM_CLASSES,
                                              ALIGN_TO_MASK, Builder), or the user's own
                                              <builder_dir>/<name>_dataset_builder.py

Official preprocessing (yikaiw/CEN semantic_segmentation main.py `create_loaders`, utils/
transforms.py, utils/datasets.py), reproduced exactly where it is deterministic:
  read        grayscale inputs (depth) are tiled to 3 channels (`read_image`)
  align       CropAlignToMask for nyudv2 (centre crop; an odd excess row/column is cut at the
              bottom/right), ResizeAlignToMask for other datasets (rgb cubic, depth nearest).
              The official resize version asserts square images and scales by mask_h/input_h;
              here inputs are resized to exactly (mask_h, mask_w) (identical for square images).
  scale       s ~ U(low_scale, high_scale); if min(H, W) * s < shorter_side, s = shorter_side /
              min(H, W); cv2.resize(fx=fy=s): rgb INTER_CUBIC, depth and mask INTER_NEAREST
  pad         to crop_size: ceil((crop-H)/2) on both sides (so the result may be crop+1), inputs
              per channel with [123.675, 116.28, 103.53] IN THE INPUT'S DTYPE (np.pad truncates:
              uint8 rgb and uint16 depth both get 123/116/103, depth included), mask with 255
  mirror      horizontal flip with probability 1/2
  crop        random crop_size x crop_size (crop_size rounded down to even, as RandomCrop does)
  normalise   rgb (x/255 - mean)/std; depth x * depth_scale (depth_scale = -2: per-image
              min-max to [0, 255], the official SUN RGB-D hook; -1: log(1 + x)); float64 maths,
              float32 output, like the official numpy -> torch.float
Eval: align + normalise only (full images, no resize).

Randomness: the per-epoch permutation is a pure function of (seed, epoch) and each example's
augmentation draws (scale, mirror, top, left, in that order) come from a generator seeded with
(seed, epoch, example index), so batches do not depend on worker count and a resumed iterator is
exact. Multi-process: every epoch the whole split is permuted with the same seed on every
process; global batch b is perm[b*B:(b+1)*B] and process p takes its contiguous slice of
B/process_count examples (reading only those). The concatenation over processes equals the
single-process batch.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import threading
import uuid
from typing import Iterator

import numpy as np

from cen_jax import preprocess

DATASETS = ('nyudv2', 'sunrgbd', 'synthetic_scenes', 'synthetic_domains', 'taskonomy')
SHAPES_FILE = 'cen_eval_shapes.json'  # per-split mask shapes, written by prepare()


# ------------------------------------------------------------------------------------------------
# Datasets.


def builder_module(name: str, builder_dir: str = ''):
  """The builder module of dataset `name`: data/<name>/<name>_dataset_builder.py (the package
  cen_jax.datasets), or, with `builder_dir` (config.data.builder_dir), the user's own
  <builder_dir>/<name>_dataset_builder.py, loaded from that file under one stable module name
  (TFDS registers a builder class once per module name)."""
  if builder_dir:
    return _user_builder_module(name, builder_dir)
  if name not in DATASETS:
    raise ValueError(f'config.data.name={name!r}: expected one of {", ".join(DATASETS)} (or '
                     f'set config.data.builder_dir to a folder holding {name}_dataset_builder.py)')
  try:
    return importlib.import_module(f'cen_jax.datasets.{name}.{name}_dataset_builder')
  except ModuleNotFoundError as e:
    if e.name not in ('cen_jax.datasets', f'cen_jax.datasets.{name}'):
      raise
    raise ModuleNotFoundError(
        'cen_jax.datasets (the builders of data/) is not installed: run `pip install -e .` in '
        'the checkout (scripts/demo.sh and scripts/test.sh do)') from None


def _user_builder_module(name: str, builder_dir: str):
  import importlib.util
  path = os.path.join(os.path.abspath(builder_dir), f'{name}_dataset_builder.py')
  # A top-level module name: TFDS reads a builder's folder from a dotted name's package.
  module_name = f'{name}_dataset_builder'
  if module_name in sys.modules:
    module = sys.modules[module_name]
    if os.path.abspath(getattr(module, '__file__', '')) != path:
      raise ValueError(f'config.data.builder_dir: {path} would replace the builder already '
                       f'loaded from {module.__file__} (one per process)')
    return module
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: not found (config.data.builder_dir={builder_dir!r} and '
                            f'config.data.name={name!r})')
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[module_name]
    raise
  return module


def dataset_module(config):
  """The builder module of config.data (name, and builder_dir when set)."""
  return builder_module(config.data.name, config.data.get('builder_dir', ''))


def _builder(config, data_dir: str):
  module = dataset_module(config)
  builder_config = config.data.get('builder_config', '') or None
  return module.Builder(data_dir=data_dir, config=builder_config, file_format='array_record')


def prepared_dir(config) -> str:
  """<data_dir>/<name>/[<builder config>/]<version> (the TFDS layout)."""
  return os.fspath(_builder(config, os.path.abspath(config.data.data_dir)).data_dir)


def _is_prepared(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, 'dataset_info.json'))


def num_classes(config) -> int:
  return int(dataset_module(config).NUM_CLASSES)


def align_mode(config) -> str:
  """'crop' (CropAlignToMask, nyudv2) or 'resize' (ResizeAlignToMask): the builder's
  ALIGN_TO_MASK."""
  return dataset_module(config).ALIGN_TO_MASK


def prepare(config, *, force: bool = False) -> str:
  """Build config.data.name into config.data.data_dir once; returns the prepared directory.

  Idempotent: an existing prepared dataset is reused (force=True rebuilds it). The dataset is
  built in a temporary directory under data_dir, moved into <data_dir>/.prepared/ and the
  returned path (the TFDS layout) made a symlink to it in one atomic step (see STORE), so an
  interrupted or failed prepare, forced or not, leaves the previously prepared dataset
  readable there. A missing or corrupt input file raises one `DatasetFileError` whose message
  starts with that file's path. With several processes, call it from process 0 only and let
  the others wait (cen_jax.train.prepare_dataset).
  """
  target = prepared_dir(config)
  data_dir = os.path.abspath(config.data.data_dir)
  _recover(target, data_dir)
  if _is_prepared(target) and not force:
    return target
  import tensorflow_datasets as tfds
  os.makedirs(data_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.prepare-{config.data.name}-', dir=data_dir)
  error_type = preprocess.DatasetFileError
  try:
    builder = _builder(config, tmp)
    manual_dir = config.data.get('manual_dir', '') or None
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
      if manual_dir is None:
        raise error_type(f'config.data.manual_dir is empty: {config.data.name!r} needs a manual '
                         f'dir.\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
      manual_dir = os.path.abspath(manual_dir)
      if not os.path.isdir(manual_dir):
        raise error_type(f'{manual_dir}: manual dir (config.data.manual_dir) not found.\n'
                         f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    try:
      with _one_progress_bar(config.data.name):
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:  # surface our one-line file error instead of TFDS's wrapping
      cause = e
      while cause is not None and not isinstance(cause, error_type):
        cause = cause.__cause__ or cause.__context__
      if cause is not None:
        raise error_type(str(cause)) from None
      raise
    built = os.fspath(builder.data_dir)
    _write_shapes(built)
    _place(built, target, data_dir, error_type)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


# Prepared copies live in <data_dir>/.prepared/<key>-<time>-<id>, and the TFDS path of the
# dataset (`prepared_dir`) is a relative symlink to one of them: a forced re-prepare swaps the
# link in one atomic os.replace, so that path always holds the old or the new dataset, whatever
# point a crash stops it at. <key> is the TFDS path under data_dir with '-' for '/'.
STORE = '.prepared'


def _store_key(target: str, data_dir: str) -> str:
  return os.path.relpath(target, data_dir).replace(os.sep, '-')


def _copies(store: str, key: str) -> list[str]:
  """The prepared copies of `key` in the store, oldest first."""
  import re
  pattern = re.compile(re.escape(key) + r'-(\d{20})-[0-9a-f]+')
  try:
    names = os.listdir(store)
  except FileNotFoundError:
    return []
  return [os.path.join(store, n) for n in sorted(n for n in names if pattern.fullmatch(n))]


def _new_copy_name(store: str, key: str, stamp: int | None = None) -> str:
  import time
  stamp = time.time_ns() if stamp is None else stamp
  return os.path.join(store, f'{key}-{stamp:020d}-{uuid.uuid4().hex[:8]}')


def _link(target: str, copy: str, *, replace: bool) -> bool:
  """Points `target` at `copy` atomically: replacing what is there (os.replace of a new link)
  or only if nothing is (os.symlink; False when something already was)."""
  relative = os.path.relpath(copy, os.path.dirname(target))
  if not replace:
    try:
      os.symlink(relative, target, target_is_directory=True)
    except FileExistsError:
      return False
    return True
  new = f'{target}.link-{uuid.uuid4().hex[:8]}'
  os.symlink(relative, new, target_is_directory=True)
  os.replace(new, target)
  return True


def _place(built: str, target: str, data_dir: str, error_type) -> None:
  """Moves a built dataset into the store and points `target` at it (see STORE); older copies
  of the dataset are then deleted. A real directory at `target` (prepared by an older
  cen-jax, or `tfds build`) first moves into the store as its oldest copy: a crash before the
  link is made leaves it findable there, and the next prepare links the newest copy."""
  store = os.path.join(data_dir, STORE)
  key = _store_key(target, data_dir)
  os.makedirs(store, exist_ok=True)
  copy = _new_copy_name(store, key)
  os.rename(built, copy)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  if os.path.isdir(target) and not os.path.islink(target):
    if _is_prepared(target):  # forced re-prepare over a real directory
      os.rename(target, _new_copy_name(store, key, stamp=0))
    else:
      try:  # an empty leftover; prepare never leaves a partial dataset here itself
        os.rmdir(target)
      except OSError:
        if not _is_prepared(target):  # (else a concurrent prepare just finished)
          shutil.rmtree(copy, ignore_errors=True)
          raise error_type(f'{target}: exists but holds no prepared dataset (no '
                           f'dataset_info.json); remove it and prepare again') from None
  if os.path.islink(target):  # a forced re-prepare, or a link whose copy is gone
    _link(target, copy, replace=True)
  elif not _link(target, copy, replace=False):  # a concurrent prepare linked its copy first
    shutil.rmtree(copy, ignore_errors=True)
    if not _is_prepared(target):
      raise error_type(f'{target}: exists but holds no prepared dataset (no '
                       f'dataset_info.json); remove it and prepare again')
    return
  current = os.path.realpath(target)
  for old in _copies(store, key):
    if old < copy and os.path.realpath(old) != current:
      shutil.rmtree(old, ignore_errors=True)
  import glob
  for stray in glob.glob(glob.escape(target) + '.link-*'):  # a crash's unused new link
    if os.path.islink(stray):
      os.remove(stray)


def _recover(target: str, data_dir: str) -> None:
  """After a crash of a forced re-prepare over a real directory between its two steps the
  dataset path is empty and the prepared copies wait in the store: link the newest."""
  if _is_prepared(target) or (os.path.lexists(target) and not os.path.islink(target)):
    return
  copies = [c for c in _copies(os.path.join(data_dir, STORE), _store_key(target, data_dir))
            if _is_prepared(c)]
  if copies:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    _link(target, copies[-1], replace=os.path.islink(target))


@contextlib.contextmanager
def _one_progress_bar(name: str):
  """During a TFDS prepare: one bar counting the examples of every split (on a terminal; none
  in logs) instead of TFDS's nested split/example/shuffle bars, and no TFDS message naming the
  temporary directory the dataset is built in."""
  import io
  from tensorflow_datasets.core import utils as tfds_utils
  from tqdm import tqdm
  bar = tqdm(desc=f'prepare {name}', unit=' examples', leave=False, file=sys.stderr,
             disable=not _is_terminal(sys.stderr))
  original = tfds_utils.tqdm

  def counting(iterable=None, *args, desc='', **kwargs):
    if iterable is not None and str(desc).endswith('examples...'):
      return (bar.update(1) or item for item in iterable)
    return tfds_utils.EmptyTqdm(iterable, *args, **kwargs)

  tfds_utils.tqdm = counting
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds_utils.tqdm = original
    bar.close()


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


def _read_only_builder(directory: str):
  import tensorflow_datasets as tfds
  return tfds.builder_from_directory(directory)


def _write_shapes(directory: str) -> None:
  """Store every example's mask shape so eval batching needs no full decode (segmentation
  datasets; translation examples are all resized to one size)."""
  shapes = {}
  builder = _read_only_builder(directory)
  if 'mask' not in builder.info.features:
    return
  for split in builder.info.splits:
    src = _Source(directory, split, skip_rgb=True)
    shapes[split] = [list(src[i]['mask'].shape) for i in range(len(src))]
  with open(os.path.join(directory, SHAPES_FILE), 'w') as f:
    json.dump(shapes, f)


_SHAPES_CACHE: dict = {}


def _mask_shapes(directory: str, split: str) -> list:
  key = (os.path.realpath(directory), split)  # a forced re-prepare links another copy
  if key not in _SHAPES_CACHE:
    path = os.path.join(directory, SHAPES_FILE)
    shapes = None
    if os.path.isfile(path):
      with open(path) as f:
        shapes = json.load(f).get(split)
    if shapes is None:  # prepared by other means (e.g. `tfds build`)
      src = _Source(directory, split, skip_rgb=True)
      shapes = [list(src[i]['mask'].shape) for i in range(len(src))]
    _SHAPES_CACHE[key] = [tuple(s) for s in shapes]
  return _SHAPES_CACHE[key]


def num_examples(config, split: str) -> int:
  directory = prepare(config)
  splits = _read_only_builder(directory).info.splits
  if split not in splits:
    raise ValueError(f'{config.data.name!r} has no split {split!r} (has {", ".join(splits)})')
  return int(splits[split].num_examples)


class _Source:
  """Picklable random-access source over a prepared split (opened lazily in each process)."""

  def __init__(self, directory: str, split: str, skip_rgb: bool = False):
    self.directory, self.split, self.skip_rgb = directory, split, skip_rgb
    self._src = None
    self._lock = threading.Lock()

  def _open(self):
    if self._src is None:
      with self._lock:
        if self._src is None:
          import tensorflow_datasets as tfds
          decoders = {'rgb': tfds.decode.SkipDecoding()} if self.skip_rgb else None
          self._src = _read_only_builder(self.directory).as_data_source(
              split=self.split, decoders=decoders)
    return self._src

  def __len__(self) -> int:
    return len(self._open())

  def __getitem__(self, index: int) -> dict:
    return self._open()[int(index)]

  def __getstate__(self):
    return {'directory': self.directory, 'split': self.split, 'skip_rgb': self.skip_rgb}

  def __setstate__(self, state):
    self.__init__(**state)


# ------------------------------------------------------------------------------------------------
# Training iterator.


def _uint(x) -> int:
  return int(x) % (1 << 63)


class _TrainElement:
  """Local stream position i -> augmented, normalised example (picklable, runs in workers)."""

  def __init__(self, config, sample, source: _Source, *, seed: int, process_index: int,
               process_count: int, num_records: int):
    self.sample = sample
    self.source = source
    self.seed = _uint(seed)
    self.global_batch = int(config.train.batch_size)
    self.local_batch = self.global_batch // process_count
    self.process_index = process_index
    self.num_records = num_records
    self.steps_per_epoch = num_records // self.global_batch
    self._perms: dict = {}

  def permutation(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_records)
      self._perms = {epoch: perm}  # epochs are consumed in order
    return perm

  def record(self, i: int) -> tuple[int, int]:
    """(epoch, example index) of local stream position i."""
    per_epoch = self.steps_per_epoch * self.local_batch
    epoch, pos = divmod(int(i), per_epoch)
    step, j = divmod(pos, self.local_batch)
    perm = self.permutation(epoch)
    return epoch, int(perm[step * self.global_batch + self.process_index * self.local_batch + j])

  def __call__(self, i, _=None) -> dict:
    epoch, index = self.record(i)
    rng = np.random.default_rng([self.seed, 1, epoch, index])
    return self.sample(self.source[index], rng)


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; outside absl.app they are not parsed yet."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class TrainIterator:
  """Endless iterator of host-local training batches with a JSON-serialisable state.

  `get_state()` -> {'next_batch': k, ...}: the number of batches yielded so far plus the settings
  that define the stream. `set_state(state)` makes the next batch batch k. The stream does not
  depend on num_workers or process_count (only the global batch size, seed and dataset do), so a
  run may resume with other worker or process counts.
  """

  def __init__(self, dataset, element: _TrainElement, *, num_workers: int, num_threads: int,
               fingerprint: dict):
    self._dataset = dataset  # grain MapDataset of batches (infinite)
    self.element = element
    self.steps_per_epoch = element.steps_per_epoch
    self._num_workers = num_workers
    self._num_threads = num_threads
    self._fingerprint = fingerprint
    self._next = 0
    self._it = None

  def peek(self) -> dict:
    """The batch `next` yields next, read without moving the iterator (the stream has random
    access): its shapes let the step compile before the state exists."""
    return self._dataset[self._next]

  def _start(self):
    import grain
    ds = self._dataset[self._next:] if self._next else self._dataset
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._num_threads,
                                              prefetch_buffer_size=2))
    if self._num_workers > 0:
      _ensure_absl_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers,
                                                       per_worker_buffer_size=2))
    self._it = iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._start()
    batch = next(self._it)
    self._next += 1
    if self._num_workers > 0:  # own the memory (grain hands out shared-memory arrays)
      batch = {k: np.array(v) for k, v in batch.items()}
    return batch

  def get_state(self) -> dict:
    return dict(self._fingerprint, next_batch=self._next)

  def set_state(self, state) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    for key, value in self._fingerprint.items():
      if key in state and state[key] != value:
        raise ValueError(f'data iterator state was saved with {key}={state[key]!r}, but this '
                         f'run has {key}={value!r}; the batch stream would differ')
    self.close()
    self._next = int(state['next_batch'])

  def close(self) -> None:
    it, self._it = self._it, None
    if it is not None and hasattr(it, 'close'):
      it.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # interpreter shutdown: nothing left to release
      return


def train_iterator(config, sample, *, seed: int, process_index: int = 0,
                   process_count: int = 1) -> TrainIterator:
  """Endless deterministic iterator of host-local batches of `sample(stored example, rng)`
  (segmentation: {modality: float32 [B,S,S,3], 'mask': int32 [B,S,S]}), B =
  config.train.batch_size // process_count, S = crop_size (rounded down to even). Each epoch is
  a fresh permutation of the split, remainder dropped. `sample` must be picklable (it runs in
  grain's worker processes)."""
  import grain
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')
  global_batch = int(config.train.batch_size)
  if global_batch % process_count:
    raise ValueError(f'config.train.batch_size={global_batch} is not divisible by '
                     f'{process_count} processes')
  directory = prepare(config)
  split = config.data.train_split
  source = _Source(directory, split)
  n = num_examples(config, split)
  if n < global_batch:
    raise ValueError(f'config.train.batch_size={global_batch} exceeds the {n} examples of '
                     f'{config.data.name!r} {split!r}')
  element = _TrainElement(config, sample, source, seed=seed, process_index=process_index,
                          process_count=process_count, num_records=n)
  per_epoch = element.steps_per_epoch * element.local_batch
  ds = grain.MapDataset.range(per_epoch).repeat().map_with_index(element)
  ds = ds.batch(element.local_batch, drop_remainder=True)
  num_workers = int(config.data.get('num_workers', 0))
  fingerprint = {'dataset': config.data.name, 'split': split, 'num_examples': n,
                 'seed': int(seed), 'global_batch': global_batch,
                 'crop_size': int(config.data.crop_size)}
  return TrainIterator(ds, element, num_workers=num_workers, num_threads=1,
                       fingerprint=fingerprint)


# ------------------------------------------------------------------------------------------------
# Eval iterator.


def eval_batches(shapes, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> list[list[int]]:
  """This process's batches of example indices: equal shapes grouped (first-seen order, index
  order inside), cut into batch_size chunks, chunks dealt round-robin to processes."""
  groups: dict = {}
  for i, shape in enumerate(shapes):
    groups.setdefault(tuple(shape), []).append(i)
  chunks = [idx[s: s + batch_size] for idx in groups.values()
            for s in range(0, len(idx), batch_size)]
  return chunks[process_index::process_count]


class _EvalBatch:
  def __init__(self, sample, source: _Source, batch_size: int):
    self.sample = sample
    self.source = source
    self.batch_size = batch_size

  def __call__(self, indices) -> dict:
    examples = [self.sample(self.source[i]) for i in indices]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    pad = self.batch_size - len(examples)
    if pad:
      for k, v in batch.items():
        fill = self.sample.fill.get(k, 0)
        batch[k] = np.concatenate([v, np.full((pad,) + v.shape[1:], fill, v.dtype)])
    batch['valid'] = np.arange(self.batch_size) < len(examples)
    batch['index'] = np.concatenate([np.asarray(indices, np.int32),
                                     np.full((pad,), -1, np.int32)])
    return batch


def eval_iterator(config, split: str, sample, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1, one_shape: bool = False) -> Iterator[dict]:
  """Full aligned, normalised images in batches of `batch_size` equal-shaped examples.

  Keys: those of `sample(stored example)` (segmentation: each modality float32 [B,H,W,3], 'mask'
  int32 [B,H,W]), 'valid' bool [B] (False for the padding examples, whose values are
  sample.fill's, else 0), 'index' int32 [B] (example index in the split, -1 for padding).
  Processes get disjoint batches covering the split once. one_shape: every example has the
  same shape (translation resizes them), so no per-example shapes are read.
  """
  import grain
  directory = prepare(config)
  if one_shape:
    shapes = [()] * num_examples(config, split)
  else:
    shapes = _mask_shapes(directory, split)
  chunks = eval_batches(shapes, batch_size, process_index, process_count)
  if not chunks:
    return _Counted(iter(()), 0)
  loader = _EvalBatch(sample, _Source(directory, split), batch_size)
  ds = grain.MapDataset.source(chunks).map(loader).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  return _Counted(iter(ds), len(chunks))


class _Counted:
  """An iterator that knows how many items it yields (len), for a progress bar."""

  def __init__(self, iterator, count: int):
    self._iterator, self._count = iterator, count

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._iterator)

  def __len__(self) -> int:
    return self._count
