"""Image files in and out for predict: reading an input as stored, matching one folder per
modality by file stem, and writing arrays atomically."""

import os

import numpy as np
from PIL import Image

from cen_jax.io_utils import atomic_write

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


def read_image(path: str, modality: str) -> np.ndarray:
  """HxW or HxWx3 array as stored (uint8 RGB; 8/16-bit depth keeps its integer values)."""
  try:
    with Image.open(path) as image:
      if modality == 'rgb' and image.mode not in ('RGB', 'L'):
        image = image.convert('RGB')  # palette / RGBA / CMYK files
      array = np.array(image)
  except (OSError, ValueError) as e:
    raise ValueError(f'cannot read {modality} image {path!r}: {e}') from None
  if array.ndim == 3 and array.shape[2] == 4:
    array = array[:, :, :3]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
    raise ValueError(f'{modality} image {path!r} has shape {array.shape}; expected HxW or HxWx3')
  return array


def save_npy(path: str, array: np.ndarray) -> str:
  """np.save through a temp file + rename (no half-written file); returns the path."""
  with atomic_write(path, 'wb') as f:
    np.save(f, array)
  return path


def images_by_stem(directory: str) -> dict:
  if not os.path.isdir(directory):
    raise ValueError(f'input folder {directory!r} does not exist')
  out = {}
  for name in sorted(os.listdir(directory)):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTENSIONS or name.startswith('.'):
      continue
    if stem in out:
      raise ValueError(f'{directory!r} holds two images with stem {stem!r}: '
                       f'{os.path.basename(out[stem])} and {name}')
    out[stem] = os.path.join(directory, name)
  return out


def match_folders(modalities, input_dirs) -> list:
  """[(stem, [path per modality])] for the stems present in every modality folder; a stem
  missing from one folder is an error (silently skipping it would hide a mismatch)."""
  modalities = list(modalities)
  if len(input_dirs) != len(modalities):
    raise ValueError(f'expected {len(modalities)} input folders ({", ".join(modalities)}), '
                     f'got {len(input_dirs)}')
  listings = [images_by_stem(d) for d in input_dirs]
  for listing, directory, modality in zip(listings, input_dirs, modalities):
    if not listing:
      raise ValueError(f'{modality} folder {directory!r} holds no images')
  stems = sorted(listings[0])
  for listing, directory, modality in zip(listings[1:], input_dirs[1:], modalities[1:]):
    if set(listing) != set(stems):
      extra = min(set(listing) ^ set(stems))
      where = directory if extra not in listing else input_dirs[0]
      raise ValueError(f'image {extra!r} has no counterpart in {where!r} '
                       f'(every {", ".join(modalities)} folder needs the same stems)')
  return [(stem, [listing[stem] for listing in listings]) for stem in stems]
