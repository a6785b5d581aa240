"""Translation samples: the official CEN image2image preprocessing (utils/dataset.py, main.py),
per example, for the input pipeline (cen_jax/input_pipeline.py).

Stored examples hold each domain as an 8-bit [H, W, 3] image, already through the official
per-domain preprocessing (cen_jax/preprocess.py `preprocess_domain`, applied by the dataset
builders at prepare time: it is deterministic, and doing it once keeps the training input
fast). Then, as the official
`DatasetFromFolder`:

  train  PIL bilinear resize to load_size x load_size (PIL antialiases when it shrinks), a
         random crop_size crop (the same for every domain of the example), a random horizontal
         flip (config.data.flip), ToTensor + Normalize(0.5, 0.5): [-1, 1] float32
  eval   PIL bilinear resize to crop_size x crop_size, [-1, 1]

The official crop offset is `random.randint(0, load - crop + 1)`, inclusive at both ends, so one
offset in (load - crop + 2) reads one pixel past the border, which PIL fills with zeros; here the
offset is drawn in [0, load - crop] (always inside the image).

Batches: {each input domain (config.modalities): float32 [B, S, S, 3], 'target': float32
[B, S, S, 3] (config.data.target)}; with branches of different targets (config.branches, e.g.
cycle fusion) 'target' is [B, M, S, S, 3], branch m's target at [:, m].
"""

import numpy as np

from cen_jax import branches as branches_lib
from cen_jax import input_pipeline
from cen_jax import preprocess

def file_to_stored(config, name: str, image: np.ndarray) -> np.ndarray:
  """A domain image as its dataset's files hold it -> as the dataset stores it (uint8
  [H, W, 3]): the official per-domain preprocessing for Taskonomy files; 8-bit images of the
  synthetic domains are stored as they are (tiled to 3 channels if single-channel)."""
  if getattr(input_pipeline.dataset_module(config), 'TASKONOMY_FILES', False):
    return preprocess.preprocess_domain(name, image)
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'domain {name!r}: expected an 8-bit grey or RGB image, got {image.dtype} '
                     f'{image.shape}')
  return image


def to_unit_range(image: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]: torchvision ToTensor (x / 255 in float32), then
  Normalize(mean 0.5, std 0.5)."""
  x = np.asarray(image, np.float32) / np.float32(255.0)
  return (x - np.float32(0.5)) / np.float32(0.5)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """PIL bilinear resize of a uint8 [H, W, 3] image to size x size (as the official)."""
  from PIL import Image
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _domains(raw: dict, names) -> dict:
  out = {}
  for name in names:
    if name not in raw:
      raise ValueError(f'domain {name!r} is not a feature of the dataset (has '
                       f'{", ".join(sorted(k for k in raw if k != "name"))})')
    image = np.asarray(raw[name])
    out[name] = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image
  return out


def branch_targets(config) -> list[str]:
  return [b.task for b in branches_lib.of_config(config)]


def has_ensemble(config) -> bool:
  """The late ensemble exists when every branch predicts the same domain."""
  return len(set(branch_targets(config))) == 1


def targets_of(config) -> tuple:
  """(one target domain,) or, for branches with different targets, every branch's target."""
  targets = branch_targets(config)
  return (targets[0],) if has_ensemble(config) else tuple(targets)


def with_target(images: dict, modalities, targets) -> dict:
  """Inputs by name, and 'target': the one target image or the branches' stacked targets."""
  out = {k: images[k] for k in modalities}
  out['target'] = images[targets[0]] if len(targets) == 1 else np.stack(
      [images[t] for t in targets])
  return out


class TrainSample:
  """A stored example -> an augmented, normalised training example (picklable)."""

  def __init__(self, config):
    d = config.data
    self.modalities = tuple(config.modalities)
    self.targets = targets_of(config)
    self.load_size = int(d.load_size)
    self.crop_size = int(d.crop_size)
    self.flip = bool(d.flip)
    if self.crop_size > self.load_size:
      raise ValueError(f'config.data.crop_size={self.crop_size} exceeds config.data.load_size='
                       f'{self.load_size}')

  def __call__(self, raw: dict, rng: np.random.Generator) -> dict:
    images = _domains(raw, tuple(dict.fromkeys(self.modalities + self.targets)))
    images = {k: resize(v, self.load_size) for k, v in images.items()}
    left = int(rng.integers(0, self.load_size - self.crop_size + 1))
    top = int(rng.integers(0, self.load_size - self.crop_size + 1))
    mirror = bool(rng.integers(2)) if self.flip else False
    out = {}
    for name, image in images.items():
      image = image[top:top + self.crop_size, left:left + self.crop_size]
      if mirror:
        image = image[:, ::-1]
      out[name] = to_unit_range(image)
    return with_target(out, self.modalities, self.targets)


class EvalSample:
  """A stored example -> the official test input: resized to crop_size, [-1, 1]."""
  fill = {}  # padding examples are all zeros

  def __init__(self, config):
    self.modalities = tuple(config.modalities)
    self.targets = targets_of(config)
    self.size = int(config.data.crop_size)

  def __call__(self, raw: dict) -> dict:
    images = _domains(raw, tuple(dict.fromkeys(self.modalities + self.targets)))
    return with_target({k: to_unit_range(resize(v, self.size)) for k, v in images.items()},
                       self.modalities, self.targets)
