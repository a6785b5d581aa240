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
normalised by transforms.normalise, exactly as the dataset is.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from cen_jax import image_files
from cen_jax import compile_cache
from cen_jax import transforms
from cen_jax import viz
from cen_jax.image_files import read_image, save_npy
from cen_jax.layers import resize
from cen_jax.models import branch_names, build_model

UPSAMPLE = {'bicubic': 'bicubic', 'bilinear': 'bilinear'}


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
  raw = transforms.read_inputs(dict(arrays, mask=np.zeros(sizes[modalities[0]], np.uint8)),
                                   modalities)
  example = transforms.normalise(config, raw)
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
  return compile_cache.CachedJit(functools.partial(_forward, build_model(config), method),
                                 config)


def _display_image(config, inputs: dict) -> np.ndarray:
  modality = 'rgb' if 'rgb' in inputs else config.modalities[0]
  return transforms.display_image(config, modality, inputs[modality])


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


def predict_folder(config, variables, input_dirs, output_dir, save_logits=False) -> list:
  """Predicts every example of the modality folders (files matched by stem); returns the paths
  written. Each new image size compiles the network once."""
  pairs = image_files.match_folders(config.modalities, input_dirs)
  predict_fn = make_predict_fn(config)
  written = []
  for _, paths in pairs:
    written += _predict_one(config, predict_fn, variables, paths, output_dir, save_logits)
  return written
