"""Examples of the dense multitask scenarios (cen_jax/tasks/dense.py): the segmentation inputs
and geometry plus the depth and surface-normal targets of the tasks in `config.branches`.

Targets (stored features of the dataset; 0 marks a pixel without a target):
  'target_depth'    float32 [H, W] metres = stored `depth` * config.data.depth_target_scale
  'target_normals'  float32 [H, W, 3] unit normals (camera frame, x right, y down, z forward)
                    decoded from the stored uint8 `normals` as (v - 128) / 127; (0, 0, 0) = none
Training applies the official segmentation geometry to inputs, mask and targets together
(transforms.augment: targets are resized like the mask, padded with 0, and a mirrored
example has the x of its normals negated); evaluation aligns them to the mask.
"""

import numpy as np

from cen_jax import branches as branches_lib
from cen_jax import input_pipeline
from cen_jax import transforms
from cen_jax.tasks import segmentation_data

# Task -> (stored feature, target key). 'semseg' reads the mask.
TARGET_FEATURES = {'depth': ('depth', 'target_depth'), 'normals': ('normals', 'target_normals')}


def decode_normals(code) -> np.ndarray:
  """uint8 [H, W, 3] as stored (round(127 n + 128), 0 = none) -> float32 unit normals."""
  code = np.asarray(code)
  normals = (code.astype(np.float32) - 128.0) / 127.0
  normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-6)
  return np.where(np.any(code > 0, axis=-1, keepdims=True), normals, 0.0).astype(np.float32)


def read_targets(raw: dict, target_tasks, depth_scale: float) -> dict:
  """{'target_<task>': array} of the requested tasks from a stored example."""
  out = {}
  for task in target_tasks:
    feature, key = TARGET_FEATURES[task]
    if feature not in raw:
      raise ValueError(f'task {task!r} needs the feature {feature!r}, which the dataset does '
                       f'not have (has {", ".join(sorted(raw))})')
    if task == 'depth':
      out[key] = (np.asarray(raw[feature], np.float64) * depth_scale).astype(np.float32)
    else:
      out[key] = decode_normals(raw[feature])
  return out


def _target_tasks(config) -> list[str]:
  return [t for t in branches_lib.tasks(branches_lib.of_config(config)) if t in TARGET_FEATURES]


class TrainSample:
  """A stored example -> augmented, normalised inputs, mask and targets (picklable)."""

  def __init__(self, config):
    d = config.data
    self.modalities = tuple(config.modalities)
    self.targets = tuple(_target_tasks(config))
    self.depth_scale = float(d.depth_target_scale)
    self.aug = segmentation_data.augment_options(config)
    self.norm_config = transforms.NormConfig(config)

  def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
    example = dict(transforms.read_inputs(raw, self.modalities),
                   **read_targets(raw, self.targets, self.depth_scale))
    example = transforms.augment(example, rng=rng, mirror_negate=('target_normals',)
                         if 'normals' in self.targets else (), **self.aug)
    return with_targets(transforms.normalise(self.norm_config, example), example)


class EvalSample:
  """A stored example -> aligned, normalised inputs, mask and targets at full size."""

  def __init__(self, config):
    self.modalities = tuple(config.modalities)
    self.targets = tuple(_target_tasks(config))
    self.depth_scale = float(config.data.depth_target_scale)
    self.align = input_pipeline.align_mode(config)
    self.norm_config = transforms.NormConfig(config)
    self.fill = {'mask': int(config.data.ignore_label)}  # padding examples; targets 0 = none

  def __call__(self, raw: dict) -> dict:
    example = dict(transforms.read_inputs(raw, self.modalities),
                   **read_targets(raw, self.targets, self.depth_scale))
    example = transforms.align_to_mask(example, self.align)
    return with_targets(transforms.normalise(self.norm_config, example), example)


def with_targets(normalised: dict, example: dict) -> dict:
  """The normalised inputs and mask plus the example's targets as contiguous float32."""
  for key, value in example.items():
    if key.startswith(transforms.TARGET_PREFIX):
      normalised[key] = np.ascontiguousarray(value, np.float32)
  return normalised
