"""Inference on image files: one image per modality (in config.modalities order) in, a
colourised mask, an overlay and optionally raw logits out.

Outputs for an input stem S:
  S_mask.png      ensemble prediction, colourised (cen_jax.viz palette), input resolution
  S_overlay.png   that mask blended over the first RGB input (else the first input, grey)
  S_<branch>.npy  with save_logits: float32 [h, w, K] logits of each branch (config.modalities
  S_ensemble.npy  names) and of the ensemble, at the network's output resolution (stride 4)
The prediction upsamples the ensemble logits to the input size with config.data.eval_upsample
('bicubic' = the official cv2 INTER_CUBIC) and takes the argmax, as the evaluation does.
Inputs are read as the official `read_image` does (grayscale tiled to 3 channels) and
normalised by input_pipeline.normalise, exactly as the dataset is.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cen_jax import input_pipeline, viz
from cen_jax.io_utils import atomic_write
from cen_jax.layers import resize
from cen_jax.models import build_model

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
UPSAMPLE = {'bicubic': 'bicubic', 'bilinear': 'bilinear'}


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


def load_inputs(config, paths) -> dict:
  """{modality: normalised float32 HxWx3} for one file per modality."""
  modalities = list(config.modalities)
  if len(paths) != len(modalities):
    raise ValueError(f'expected {len(modalities)} input files ({", ".join(modalities)}), '
                     f'got {len(paths)}')
  arrays = {m: read_image(p, m) for m, p in zip(modalities, paths)}
  sizes = {m: a.shape[:2] for m, a in arrays.items()}
  if len(set(sizes.values())) > 1:
    raise ValueError('inputs differ in size: ' + ', '.join(
        f'{m} {os.path.basename(p)} {sizes[m][0]}x{sizes[m][1]}'
        for m, p in zip(modalities, paths)))
  raw = input_pipeline.read_inputs(dict(arrays, mask=np.zeros(sizes[modalities[0]], np.uint8)),
                                   modalities)
  example = input_pipeline.normalise(config, raw)
  return {m: example[m] for m in modalities}


def stack_inputs(config, inputs: dict) -> np.ndarray:
  """[M, 1, H, W, 3] float32, branch m = config.modalities[m]."""
  return np.stack([inputs[m] for m in config.modalities])[:, None]


def _forward(model, method, variables, x):
  out = model.apply(variables, x, train=False)
  ensemble = resize(out['ensemble'], x.shape[-3:-1], method)
  return out['branches'], out['ensemble'], jnp.argmax(ensemble, axis=-1)


def make_predict_fn(config):
  """Jitted (variables, x [M, 1, H, W, 3]) -> (branch logits [M, 1, h, w, K], ensemble
  logits [1, h, w, K], ensemble prediction int [1, H, W])."""
  method = UPSAMPLE.get(config.data.eval_upsample)
  if method is None:
    raise ValueError(f'config.data.eval_upsample={config.data.eval_upsample!r}: expected one '
                     f'of {sorted(UPSAMPLE)}')
  return jax.jit(functools.partial(_forward, build_model(config), method))


def _display_image(config, inputs: dict) -> np.ndarray:
  modality = 'rgb' if 'rgb' in inputs else config.modalities[0]
  return input_pipeline.to_display_image(config, modality, inputs[modality])


def save_npy(path: str, array: np.ndarray) -> str:
  """np.save through a temp file + rename (no half-written file); returns the path."""
  with atomic_write(path, 'wb') as f:
    np.save(f, array)
  return path


def _predict_one(config, predict_fn, variables, paths, output_dir, save_logits) -> list:
  inputs = load_inputs(config, paths)
  branches, ensemble, mask = jax.device_get(predict_fn(variables, stack_inputs(config, inputs)))
  stem = os.path.splitext(os.path.basename(paths[0]))[0]
  mask = np.asarray(mask[0], np.int32)
  written = [os.path.join(output_dir, f'{stem}_mask.png'),
             os.path.join(output_dir, f'{stem}_overlay.png')]
  viz.save_png(written[0], viz.colorize(mask))
  viz.save_png(written[1], viz.overlay(_display_image(config, inputs), mask))
  if save_logits:
    from cen_jax.models import branch_names
    logits = {name: branches[m, 0] for m, name in enumerate(branch_names(config))}
    logits['ensemble'] = ensemble[0]
    for name, array in logits.items():
      path = os.path.join(output_dir, f'{stem}_{name}.npy')
      save_npy(path, np.asarray(array, np.float32))
      written.append(path)
  return written


def predict_files(config, variables, input_paths, output_dir, save_logits=False) -> list:
  """Predicts one example (one file per modality); returns the paths written."""
  predict_fn = make_predict_fn(config)
  return _predict_one(config, predict_fn, variables, list(input_paths), output_dir, save_logits)


def _images_by_stem(directory: str) -> dict:
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


def match_folders(config, input_dirs) -> list:
  """[(stem, [path per modality])] for the stems present in every modality folder; a stem
  missing from one folder is an error (silently skipping it would hide a mismatch)."""
  modalities = list(config.modalities)
  if len(input_dirs) != len(modalities):
    raise ValueError(f'expected {len(modalities)} input folders ({", ".join(modalities)}), '
                     f'got {len(input_dirs)}')
  listings = [_images_by_stem(d) for d in input_dirs]
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


def predict_folder(config, variables, input_dirs, output_dir, save_logits=False) -> list:
  """Predicts every example of the modality folders (files matched by stem); returns the paths
  written. Each new image size compiles the network once."""
  pairs = match_folders(config, input_dirs)
  predict_fn = make_predict_fn(config)
  written = []
  for _, paths in pairs:
    written += _predict_one(config, predict_fn, variables, paths, output_dir, save_logits)
  return written
