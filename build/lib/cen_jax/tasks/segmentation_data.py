"""Segmentation samples: a stored example -> the official training or evaluation example
(cen_jax/transforms.py), for the input pipeline."""

import numpy as np

from cen_jax import input_pipeline
from cen_jax import transforms


def augment_options(config) -> dict:
  """The keyword arguments of `transforms.augment` that the config sets."""
  d = config.data
  return dict(align=input_pipeline.align_mode(config), crop_size=int(d.crop_size),
              shorter_side=int(d.shorter_side), low_scale=float(d.low_scale),
              high_scale=float(d.high_scale), ignore_label=int(d.ignore_label))


class TrainSample:
  """A stored example -> the official segmentation training example (picklable)."""

  def __init__(self, config):
    self.modalities = tuple(config.modalities)
    self.aug = augment_options(config)
    self.norm_config = transforms.NormConfig(config)

  def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
    example = transforms.read_inputs(raw, self.modalities)
    return transforms.normalise(self.norm_config,
                                transforms.augment(example, rng=rng, **self.aug))


class EvalSample:
  """A stored example -> the official evaluation input (aligned, normalised, full size)."""

  def __init__(self, config):
    self.modalities = tuple(config.modalities)
    self.align = input_pipeline.align_mode(config)
    self.norm_config = transforms.NormConfig(config)
    self.fill = {'mask': int(config.data.ignore_label)}  # padding examples

  def __call__(self, raw: dict) -> dict:
    example = transforms.read_inputs(raw, self.modalities)
    return transforms.normalise(self.norm_config, transforms.align_to_mask(example, self.align))
