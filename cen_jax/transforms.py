"""The official CEN RGB-D transforms (yikaiw/CEN semantic_segmentation utils/transforms.py), in
numpy and cv2, reproduced exactly where they are deterministic. The segmentation and dense tasks
build their samples from them; the geometry is described in cen_jax/input_pipeline.py.

  read_inputs(raw, modalities) -> dict        a stored example as official read_image gives it
  augment(example, *, align, crop_size, shorter_side, low_scale, high_scale, ignore_label, rng)
                                              the official train geometry (un-normalised)
  align_to_mask(example, align)               the official eval geometry (un-normalised)
  normalise(config, example) -> dict          float32 inputs (+ int32 mask)
  denormalize_rgb(config, x) -> uint8         inverse of the RGB normalisation, for previews
  display_image(config, modality, x)          uint8 HxWx3 preview of a normalised input
  NormConfig(config)                          the config values `normalise` reads (picklable)
"""

import numpy as np

TARGET_PREFIX = 'target_'  # dense targets (cen_jax/tasks/dense_data.py): resized, padded as labels
PAD_VALUES = (123.675, 116.28, 103.53)  # official Pad value for every input (ImageNet mean * 255)


def _cv2():
  import cv2
  cv2.setNumThreads(1)  # workers parallelise across examples
  return cv2


def _interp(cv2, key: str):
  """Nearest for depth and every label-like key (mask, target_*), bicubic for images."""
  if key in ('depth', 'mask') or key.startswith(TARGET_PREFIX):
    return cv2.INTER_NEAREST
  return cv2.INTER_CUBIC


def read_inputs(raw: dict, modalities) -> dict:
  """{modality: HxWx3 array (uint8 rgb, uint16 depth tiled to 3 channels), 'mask': uint8 HxW}."""
  out = {'mask': np.asarray(raw['mask'])}
  for key in modalities:
    if key not in raw:
      raise ValueError(f'modality {key!r} is not a feature of the dataset (has '
                       f'{", ".join(sorted(raw))})')
    arr = np.asarray(raw[key])
    if arr.ndim == 2:  # official read_image: grayscale tiled to 3 channels
      arr = np.repeat(arr[:, :, None], 3, axis=2)
    out[key] = arr
  return out


def _inputs(example: dict):
  return [k for k in example if k != 'mask' and not k.startswith(TARGET_PREFIX)]


def align_to_mask(example: dict, align: str) -> dict:
  """CropAlignToMask ('crop') or ResizeAlignToMask ('resize') of every input to the mask size."""
  mh, mw = example['mask'].shape[:2]
  out = {'mask': example['mask']}
  for key in (k for k in example if k != 'mask'):
    x = example[key]
    h, w = x.shape[:2]
    if (h, w) != (mh, mw):
      if align == 'crop':
        if h < mh or w < mw:
          raise ValueError(f'{key} is {h}x{w}, smaller than its mask {mh}x{mw}')
        top, left = (h - mh) // 2, (w - mw) // 2
        x = x[top: h - top - (h - mh) % 2, left: w - left - (w - mw) % 2]
      elif align == 'resize':
        cv2 = _cv2()
        x = cv2.resize(x, (mw, mh), interpolation=_interp(cv2, key))
      else:
        raise ValueError(f'align={align!r}: expected "crop" or "resize"')
    out[key] = x
  return out


def augment(example: dict, *, align: str, crop_size: int, shorter_side: int, low_scale: float,
            high_scale: float, ignore_label: int, rng: np.random.Generator,
            mirror_negate=()) -> dict:
  """Official training geometry on `read_inputs` output; values stay un-normalised.

  Keys starting with TARGET_PREFIX (dense targets, 0 = no target) follow the mask: nearest
  resize, padded with 0; the first channel of the keys in `mirror_negate` (surface normals'
  x) changes sign when the example is mirrored."""
  cv2 = _cv2()
  example = align_to_mask(example, align)
  keys = _inputs(example)
  targets = [k for k in example if k.startswith(TARGET_PREFIX)]
  # ResizeAndScale (shorter side).
  h, w = example['mask'].shape[:2]
  scale = rng.uniform(low_scale, high_scale)
  if min(h, w) * scale < shorter_side:
    scale = shorter_side * 1.0 / min(h, w)
  out = {k: cv2.resize(example[k], None, fx=scale, fy=scale, interpolation=_interp(cv2, k))
         for k in keys}
  for k in ['mask'] + targets:
    out[k] = cv2.resize(example[k], None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
  # Pad (inputs per channel, in their own dtype; mask with the ignore label).
  h, w = out['mask'].shape[:2]
  h_pad = int(np.clip((crop_size - h + 1) // 2, 0, 1e6))
  w_pad = int(np.clip((crop_size - w + 1) // 2, 0, 1e6))
  if h_pad or w_pad:
    pad = ((h_pad, h_pad), (w_pad, w_pad))
    for k in keys:
      x = out[k]
      out[k] = np.stack([np.pad(x[:, :, c], pad, mode='constant', constant_values=PAD_VALUES[c])
                         for c in range(3)], axis=2)
    out['mask'] = np.pad(out['mask'], pad, mode='constant', constant_values=ignore_label)
    for k in targets:
      out[k] = np.pad(out[k], pad + ((0, 0),) * (out[k].ndim - 2), mode='constant')
  # RandomMirror.
  if rng.integers(2):
    out = {k: v[:, ::-1] for k, v in out.items()}
    for k in mirror_negate:
      out[k] = out[k] * np.asarray([-1.0] + [1.0] * (out[k].shape[-1] - 1), out[k].dtype)
  # RandomCrop.
  size = crop_size - crop_size % 2
  h, w = out['mask'].shape[:2]
  new_h, new_w = min(h, size), min(w, size)
  top = int(rng.integers(0, h - new_h + 1))
  left = int(rng.integers(0, w - new_w + 1))
  return {k: np.ascontiguousarray(v[top: top + new_h, left: left + new_w])
          for k, v in out.items()}


def normalise(config, example: dict) -> dict:
  """float32 inputs (official Normalise) and an int32 mask."""
  d = config.data
  out = {'mask': np.asarray(example['mask'], np.int32)}
  mean = np.asarray(d.rgb_mean, np.float64)
  std = np.asarray(d.rgb_std, np.float64)
  for key in _inputs(example):
    x = example[key]
    if key == 'depth':
      scale = float(d.depth_scale)
      if scale > 0:
        x = scale * x.astype(np.float64)
      elif scale == -1:  # taskonomy hook
        x = np.log(1 + x.astype(np.float64))
      elif scale == -2:  # SUN RGB-D hook: per-image min-max to [0, 255]
        x = x.astype(np.float64)
        lo, hi = x.min(), x.max()
        x = (x - lo) * 255.0 / (hi - lo) if hi > lo else np.zeros_like(x)
      else:
        raise ValueError(f'config.data.depth_scale={scale}: expected > 0, -1 or -2')
    else:
      x = (1.0 / 255 * x.astype(np.float64) - mean) / std
    out[key] = x.astype(np.float32)
  return out


def denormalize_rgb(config, x) -> np.ndarray:
  """uint8 HxWx3 image from a normalised RGB array (inverse of `normalise`)."""
  x = np.asarray(x, np.float64) * np.asarray(config.data.rgb_std) + np.asarray(config.data.rgb_mean)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def display_image(config, modality: str, x) -> np.ndarray:
  """uint8 HxWx3 preview of one normalised input (rgb de-normalised; others min-max grey)."""
  if modality in ('rgb', 'defocus'):  # colour images, normalised as rgb
    return denormalize_rgb(config, x)
  x = np.asarray(x, np.float64)
  x = x[..., 0] if x.ndim == 3 else x
  lo, hi = float(x.min()), float(x.max())
  grey = np.zeros(x.shape, np.uint8) if hi <= lo else \
      np.round((x - lo) * 255.0 / (hi - lo)).astype(np.uint8)
  return np.repeat(grey[:, :, None], 3, axis=2)


class NormConfig:
  """The few config values `normalise` reads (config objects need not be pickled)."""

  def __init__(self, config):
    from types import SimpleNamespace
    d = config.data
    self.data = SimpleNamespace(rgb_mean=tuple(d.rgb_mean), rgb_std=tuple(d.rgb_std),
                                depth_scale=float(d.depth_scale))

  def __getstate__(self):
    return vars(self.data)

  def __setstate__(self, state):
    from types import SimpleNamespace
    self.data = SimpleNamespace(**state)
