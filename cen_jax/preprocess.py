"""What the dataset builders (data/) read files with: the official CEN RGB-D layout, and the
per-domain preprocessing of translation domains. The one cen_jax module a builder imports.

RGB-D layout of a manual dir (the one yikaiw/CEN's `SegDataset` reads; the nyudv2 and sunrgbd
builders): PNG (or any PIL-readable) files in folders such as `rgb/`, `depth/`, `masks/`, and
list files with one example per line, three tab-separated paths relative to the manual dir, in
the order rgb, mask, depth:

    rgb/000003.png<TAB>masks/000003.png<TAB>depth/000003.png

Decoding follows the official `read_image` (PIL; a grayscale RGB image is tiled to 3 channels)
and mask reading (PIL, must be a 2-D index image; palette PNGs give their indices). Depth must
be single-channel (8- or 16-bit); it is stored as uint16 raw values. Every problem with a file
raises `DatasetFileError` with one line naming the file.

Translation domains (the taskonomy builder, and predict on raw files): `preprocess_domain`.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Iterator, Optional

import numpy as np

TEST_LIST_NAMES = ('test.txt', 'val.txt')  # the official NYUDv2 list is called val.txt


IGNORE_LABEL = 255


class DatasetFileError(ValueError):
  """A file named in a list (or the list itself) is missing, unreadable or malformed."""


def features(tfds, *, normals: bool = False):
  """The FeaturesDict shared by every CEN RGB-D builder; with `normals`, also the surface
  normals of the multitask scenarios (uint8 HxWx3, round(127 n + 128), (0, 0, 0) = none)."""
  spec = {
      'rgb': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
      'depth': tfds.features.Tensor(shape=(None, None), dtype=np.uint16, encoding='zlib'),
      'mask': tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding='zlib'),
      'name': tfds.features.Text(),
  }
  if normals:
    spec['normals'] = tfds.features.Image(shape=(None, None, 3), dtype=np.uint8)
  return tfds.features.FeaturesDict(spec)


def normals_path(manual_dir: str, normals_dir: str, rgb_rel: str) -> str:
  """The user-supplied normals of an example: <normals_dir>/<rgb file stem>.png."""
  stem = os.path.splitext(os.path.basename(rgb_rel))[0]
  return os.path.join(manual_dir, normals_dir, stem + '.png')


def read_normals(path: str, shape) -> np.ndarray:
  arr = _open(path)
  if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
    raise DatasetFileError(f'{path}: expected 8-bit RGB normals (round(127 n + 128), 0 = none), '
                           f'got shape {arr.shape} dtype {arr.dtype}')
  if arr.shape[:2] != tuple(shape):
    raise DatasetFileError(f'{path}: normals are {arr.shape[0]}x{arr.shape[1]}, its rgb is '
                           f'{shape[0]}x{shape[1]}')
  return arr


def png_bytes(rgb: np.ndarray) -> bytes:
  """Lossless PNG encoding done here with PIL (TFDS would need TensorFlow to encode arrays)."""
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format='PNG', compress_level=3)
  return buf.getvalue()


def find_list(manual_dir: str, split: str) -> str:
  """Path of the list file of `split` ('train' -> train.txt; 'test' -> test.txt, else val.txt)."""
  names = ('train.txt',) if split == 'train' else TEST_LIST_NAMES
  for name in names:
    path = os.path.join(manual_dir, name)
    if os.path.isfile(path):
      return path
  raise DatasetFileError(f'{os.path.join(manual_dir, names[0])}: list file for split '
                         f'{split!r} not found (expected one of {", ".join(names)} in '
                         f'{manual_dir})')


def read_list(path: str) -> list[tuple[str, str, str]]:
  """[(rgb, mask, depth)] relative paths of a list file; blank lines are skipped."""
  try:
    with open(path, 'rb') as f:
      lines = f.read().decode('utf-8').splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DatasetFileError(f'{path}: cannot read list file ({e})') from None
  entries = []
  for number, line in enumerate(lines, 1):
    line = line.strip('\r\n')
    if not line.strip():
      continue
    fields = line.split('\t')
    if len(fields) != 3 or not all(fields):
      raise DatasetFileError(
          f'{path}:{number}: expected 3 tab-separated paths (rgb, mask, depth), got {line!r}')
    entries.append(tuple(fields))
  if not entries:
    raise DatasetFileError(f'{path}: list file has no examples')
  return entries


def _open(path: str, info: dict | None = None) -> np.ndarray:
  from PIL import Image
  if not os.path.isfile(path):
    raise DatasetFileError(f'{path}: file not found')
  try:
    with Image.open(path) as img:
      img.load()
      if info is not None:
        info.update(format=img.format, mode=img.mode)
      return np.array(img)
  except Exception as e:  # PIL raises many types for truncated/corrupt files
    raise DatasetFileError(f'{path}: cannot decode image ({type(e).__name__}: {e})') from None


def read_rgb(path: str, info: dict | None = None) -> np.ndarray:
  arr = _open(path, info)
  if arr.ndim == 2:  # grayscale, tiled like the official read_image
    arr = np.repeat(arr[:, :, None], 3, axis=2)
  if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
    raise DatasetFileError(f'{path}: expected an 8-bit RGB image, got shape {arr.shape} '
                           f'dtype {arr.dtype}')
  return arr


def _fit_integer(path: str, arr: np.ndarray, dtype, what: str) -> np.ndarray:
  """`arr` as `dtype`, refusing values that do not fit (e.g. a float or 32-bit PNG)."""
  if arr.dtype == dtype:
    return arr
  limits = np.iinfo(dtype)
  if not np.issubdtype(arr.dtype, np.integer) or arr.min() < limits.min or arr.max() > limits.max:
    raise DatasetFileError(f'{path}: {what} values of dtype {arr.dtype} do not fit '
                           f'{np.dtype(dtype).name}')
  return arr.astype(dtype)


def read_depth(path: str) -> np.ndarray:
  arr = _open(path)
  if arr.ndim != 2:
    raise DatasetFileError(f'{path}: expected a single-channel (8/16-bit) depth image, got '
                           f'shape {arr.shape}')
  return _fit_integer(path, arr, np.uint16, 'depth')


def read_mask(path: str) -> np.ndarray:
  arr = _open(path)
  if arr.ndim != 2:
    raise DatasetFileError(f'{path}: masks must be 2-D index images without colour map, got '
                           f'shape {arr.shape}')
  return _fit_integer(path, arr, np.uint8, 'mask')


def sun_mask_fallback(path: str) -> Optional[str]:
  """The official SUN RGB-D fallback: if a mask is missing, its 6-digit number + 5050."""
  m = re.match(r'^(.*?)(\d{6})(\.[^./\\]+)$', path)
  if m is None:
    return None
  return f'{m.group(1)}{int(m.group(2)) + 5050:06d}{m.group(3)}'


def generate_examples(manual_dir: str, list_path: str, *, num_classes: int,
                      check: Optional[Callable[[dict, tuple], None]] = None,
                      mask_fallback: bool = False,
                      normals_dir: str = '') -> Iterator[tuple[int, dict]]:
  """(key, example) for each list entry, in list order (key = line position). Every example is
  checked (labels in [0, num_classes) or 255, then the dataset's `check`) before it is yielded,
  so a bad file fails the prepare, which leaves nothing behind. rgb and depth are stored at
  their own sizes: as in the official pipeline, each is aligned to the mask on its own when
  read (input_pipeline.align_to_mask), so they need not match each other. With `normals_dir`,
  each example also gets the normals `normals_path` names (rgb's size)."""
  entries = read_list(list_path)
  if normals_dir:
    for rgb_rel, _, _ in entries:
      path = normals_path(manual_dir, normals_dir, rgb_rel)
      if not os.path.isfile(path):
        raise DatasetFileError(f'{path}: file not found (the normals of {rgb_rel}, listed in '
                               f'{list_path})')
  # Fail fast, before any decoding, on the first missing file.
  for rel in entries:
    for i, r in enumerate(rel):
      path = os.path.join(manual_dir, r)
      if os.path.isfile(path):
        continue
      if i == 1 and mask_fallback:
        alt = sun_mask_fallback(path)
        if alt is not None and os.path.isfile(alt):
          continue
        raise DatasetFileError(f'{path}: file not found (listed in {list_path}; the SUN '
                               f'fallback {alt} does not exist either)')
      raise DatasetFileError(f'{path}: file not found (listed in {list_path})')
  for key, (rgb_rel, mask_rel, depth_rel) in enumerate(entries):
    mask_path = os.path.join(manual_dir, mask_rel)
    if mask_fallback and not os.path.isfile(mask_path):
      mask_path = sun_mask_fallback(mask_path)
    rgb_info = {}
    example = {
        'rgb': read_rgb(os.path.join(manual_dir, rgb_rel), rgb_info),
        'depth': read_depth(os.path.join(manual_dir, depth_rel)),
        'mask': read_mask(mask_path),
        'name': rgb_rel,
    }
    paths = (os.path.join(manual_dir, rgb_rel), mask_path, os.path.join(manual_dir, depth_rel))
    check_labels(example['mask'], mask_path, num_classes)
    if normals_dir:
      example['normals'] = png_bytes(read_normals(
          normals_path(manual_dir, normals_dir, rgb_rel), example['rgb'].shape[:2]))
    if check is not None:
      check(example, paths)
    raw = None
    if rgb_info.get('format') == 'PNG' and rgb_info.get('mode') == 'RGB':
      with open(os.path.join(manual_dir, rgb_rel), 'rb') as f:
        raw = f.read()
      if not (raw[:8] == b'\x89PNG\r\n\x1a\n' and raw[24] == 8 and raw[25] == 2):
        raw = None  # not an 8-bit truecolour PNG
    # An 8-bit RGB PNG is stored as is (lossless). Anything else (JPEG: keep PIL's decoding, as
    # the official reader; grayscale; palette) is re-encoded from the decoded array.
    example['rgb'] = raw if raw is not None else png_bytes(example['rgb'])
    yield key, example


def check_labels(mask: np.ndarray, path: str, num_classes: int) -> None:
  """Every label is a class in [0, num_classes) or the ignore label 255."""
  bad = (mask >= num_classes) & (mask != IGNORE_LABEL)
  if bad.any():
    values = sorted(int(v) for v in np.unique(mask[bad]))
    y, x = np.argwhere(bad)[0]
    raise DatasetFileError(f'{path}: label {values[0]} at row {y}, column {x} is outside '
                           f'[0, {num_classes}) and is not the ignore label {IGNORE_LABEL} '
                           f'(bad labels: {values[:8]})')


def check_not_smaller_than_mask(example: dict, paths: tuple) -> None:
  """CropAlignToMask needs inputs at least as large as the mask."""
  mh, mw = example['mask'].shape
  for key, path in (('rgb', paths[0]), ('depth', paths[2])):
    h, w = example[key].shape[:2]
    if h < mh or w < mw:
      raise DatasetFileError(f'{path}: {key} is {h}x{w}, smaller than its mask {paths[1]} '
                             f'({mh}x{mw}); crop-to-mask alignment needs inputs >= mask')


def check_manual_dir(manual_dir: str, instructions: str) -> None:
  if not manual_dir or not os.path.isdir(manual_dir):
    first = instructions.strip().splitlines()[0] if instructions.strip() else ''
    raise DatasetFileError(f'{manual_dir or "<empty manual_dir>"}: manual dir not found. {first}')


# The official maxima (dataset.py max_v; the minima are 0) of the 16-bit domains.
DOMAIN_MAX = {'edge_texture': 11355.0, 'edge_occlusion': 11584.0,
              'depth_euclidean': 11.1, 'depth_zbuffer': 11.1}


def preprocess_domain(name: str, image: np.ndarray) -> np.ndarray:
  """The official per-domain preprocessing of a decoded PNG -> uint8 [H, W, 3].

  Single-channel images are tiled to 3 channels; depth domains take log(1 + x) on 32-bit
  integers, as the official code got them (the Pillow of its time opened 16-bit PNGs in mode
  'I', int32; today's opens them as uint16, where 65535 + 1 would wrap to 0 and log to -inf):
  a 65535 'no depth' pixel becomes log(65536) * 255 / 11.1 = 254; domains with an official
  maximum are scaled by 255 / max; then `astype(uint8)` truncates (values past 255 wrap, as
  the official cast does).
  Images no rule touches keep their values and dtype must already be 8-bit.
  """
  image = np.asarray(image)
  file_dtype = image.dtype
  changed = False
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
    changed = True
  if image.ndim == 3 and image.shape[2] == 4:
    image = image[:, :, :3]  # RGBA PNGs: the official reader's tensors keep 3 channels
  if image.dtype.kind in 'iu' and image.dtype.itemsize == 2:
    image = image.astype(np.int32)  # Pillow mode 'I', as the official read 16-bit PNGs
  if 'depth' in name:
    with np.errstate(divide='ignore', invalid='ignore'):
      image = np.log(1 + image)
    changed = True
  if name in DOMAIN_MAX:
    image = image * 255.0 / DOMAIN_MAX[name]
    changed = True
  if changed:
    with np.errstate(invalid='ignore', over='ignore'):
      floor = np.where(np.isfinite(image), image, 0.0) if image.dtype.kind == 'f' else image
      image = floor.astype(np.int64).astype(np.uint8) if image.dtype.kind == 'f' else \
          image.astype(np.uint8)
  if image.dtype != np.uint8:
    raise ValueError(f'domain {name!r}: expected an 8-bit image, got {file_dtype} (only '
                     f'{sorted(DOMAIN_MAX)} and depth domains are rescaled from 16 bits)')
  return image
