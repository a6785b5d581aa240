"""Synthetic RGB-D scenes: a deterministic, download-free dataset where RGB and depth are both needed.

Each image shows a background (a wall that bends into a floor towards the bottom) and 2..5
rectangles/ellipses. Shape, size and position are drawn independently of the class, and
objects are painted far-to-near so nearer objects occlude farther ones. Classes
(NUM_CLASSES = 7, CLASS_NAMES):

  0 background   low-saturation colour of random hue, depth 3.6..4.4 m (nearer at the floor)
  1 red    }     COLOUR-ONLY classes: identical depth statistics (object depth ~ U(1.0, 3.0) m),
  2 green  }     hues 0 / 120 / 240 degrees (+-12 jitter, random saturation and value)
  3 blue   }
  4 near   }     DEPTH-ONLY classes: identical colour statistics (yellow, hue 60 +-12 degrees),
  5 middle }     depth N(1.25 / 2.0 / 2.75 m, 0.08 m)
  6 far    }

Depth-only classes look alike in RGB and colour-only classes look alike in depth (their depth
range covers the depth-only levels too), so an RGB-only model confuses classes 4-6 and a
depth-only model confuses 1-3 (and 1-3 with 4-6); a model seeing both can separate all 7.
Checked with a per-pixel Gaussian classifier (tests/test_data_builders.py, 32x32): IoU of
classes 4-6 from RGB alone ~0.2, of classes 1-3 from depth alone ~0.1, mIoU from both ~0.99.
Every object also gets a random slant in depth and a brightness gradient in colour; every pixel
gets Gaussian noise (RGB sigma 12 levels, depth sigma 0.03 m). About a quarter of the pixels on
object boundaries are labelled 255 (ignore).

Storage follows the NYUDv2 conventions of the pipeline: `rgb` uint8 HxWx3, `depth` uint16 HxW
holding metres * 5000 (config.data.depth_scale = 1/5000 turns it back into metres), `mask` uint8
HxW (255 = ignore), `normals` and `defocus` uint8 HxWx3, `name`. Generation is a pure
function of (SEED, split, index).

Surface normals (version 1.1.0; the multitask targets, cen_jax/dense_data.py) come from the
noise-free depth through a pinhole camera with the principal point at the image centre and a
focal length of FOCAL_IN_WIDTHS image widths, in camera coordinates (x right, y down, z
forward), facing the camera. They are stored as uint8 round(127 n + 128), in [1, 255];
(0, 0, 0) marks pixels without a normal (within one pixel of an occlusion boundary). Adding
them changed no other feature (they draw nothing from the generator).

The defocus image (version 1.2.0; the single input of the multitask demo,
configs/demo_dense.py) is the rgb image as a camera focused at FOCUS_METRES with a shallow
depth of field sees it: each pixel is the rgb image blurred by a Gaussian of
sigma = BLUR_PX_PER_METRE * (d - FOCUS_METRES) pixels (0 in front of the focal plane), d the
noise-free depth (`defocus`; a linear stand-in for the thin-lens circle of confusion, steep
enough that the three depth-only levels get sigma 0.15 / 0.6 / 1.05 px). The per-pixel noise
of rgb plays the role of fine surface texture, so how much of it survives tells depth:
unlike rgb, this one image holds both the colours and the depth-only classes. It draws
nothing from the generator, so the other features are those of 1.1.0.

BuilderConfigs: 'default' 64x64 with 1000 train / 200 test; 'small' 32x32 with 200 / 50;
'tiny' 16x20 with 8 / 6 (smoke tests). Custom sizes: pass
`config=SyntheticScenesConfig(name=..., height=..., width=..., num_train=..., num_test=...)`.
"""

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from cen_jax import preprocess

NUM_CLASSES = 7
IGNORE_LABEL = 255
ALIGN_TO_MASK = 'crop'  # inputs already have the mask's size
CLASS_NAMES = ('background', 'red', 'green', 'blue', 'near', 'middle', 'far')
COLOUR_CLASSES = (1, 2, 3)
DEPTH_CLASSES = (4, 5, 6)
SEED = 20201105
DEPTH_UNITS_PER_METRE = 5000.0
FOCAL_IN_WIDTHS = 4.0  # telephoto: object slants tilt normals by up to ~20 degrees
FOCUS_METRES = 1.0  # the defocus image's focal plane: just in front of the nearest objects
BLUR_PX_PER_METRE = 0.6
BLUR_SIGMA_STEP = 0.25  # spacing of the blur bank that `defocus` interpolates

_HUES = {1: 0.0, 2: 120.0, 3: 240.0, 4: 60.0, 5: 60.0, 6: 60.0}
_DEPTH_LEVELS = {4: 1.25, 5: 2.0, 6: 2.75}
_SPLIT_CODES = {'train': 0, 'test': 1}


@dataclasses.dataclass(eq=False)
class SyntheticScenesConfig(tfds.core.BuilderConfig):
  height: int = 64
  width: int = 64
  num_train: int = 1000
  num_test: int = 200


def _hsv_to_rgb(h, s, v):
  """Scalars: hue in degrees, s and v in [0, 1] -> float RGB in [0, 255]."""
  h = (h % 360.0) / 60.0
  c = v * s
  x = c * (1 - abs(h % 2 - 1))
  rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
  return (np.array(rgb) + (v - c)) * 255.0


def camera_normals(depth: np.ndarray, focal: float) -> np.ndarray:
  """Unit normals [H, W, 3] of a depth map (metres) seen by a pinhole camera with focal length
  `focal` pixels and the principal point at the image centre; oriented towards the camera."""
  height, width = depth.shape
  v, u = np.mgrid[0:height, 0:width].astype(np.float64)
  u = u - (width - 1) / 2.0
  v = v - (height - 1) / 2.0
  z_v, z_u = np.gradient(depth)
  # Tangents of P(u, v) = z * (u / f, v / f, 1) along u and v.
  t_u = np.stack([(depth + u * z_u) / focal, v * z_u / focal, z_u], axis=-1)
  t_v = np.stack([u * z_v / focal, (depth + v * z_v) / focal, z_v], axis=-1)
  n = np.cross(t_u, t_v)
  n /= np.linalg.norm(n, axis=-1, keepdims=True)
  ray = np.stack([u / focal, v / focal, np.ones_like(u)], axis=-1)
  return np.where(np.sum(n * ray, axis=-1, keepdims=True) > 0, -n, n)


def encode_normals(normals: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3]: round(127 n + 128) in [1, 255] where valid, (0, 0, 0) elsewhere."""
  code = np.clip(np.round(127.0 * normals + 128.0), 1, 255).astype(np.uint8)
  return np.where(valid[..., None], code, 0).astype(np.uint8)


def defocus(image: np.ndarray, sigma: np.ndarray) -> np.ndarray:
  """float64 [H, W, C]: `image` blurred at each pixel by a Gaussian of that pixel's `sigma`
  [H, W] (pixels, >= 0), linearly interpolated between blurs at multiples of BLUR_SIGMA_STEP
  (scipy's gaussian_filter, reflected borders)."""
  from scipy import ndimage
  image = np.asarray(image, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if sigma.shape != image.shape[:2] or np.any(sigma < 0):
    raise ValueError(f'defocus: sigma must be [H, W] = {image.shape[:2]} and >= 0, got shape '
                     f'{sigma.shape}, min {sigma.min() if sigma.size else None}')
  position = sigma / BLUR_SIGMA_STEP
  levels = np.arange(int(np.ceil(position.max())) + 1)
  bank = np.stack([ndimage.gaussian_filter(image, (BLUR_SIGMA_STEP * k, BLUR_SIGMA_STEP * k, 0),
                                           mode='reflect') for k in levels])
  lower = np.minimum(np.floor(position).astype(np.int64), len(levels) - 1)
  upper = np.minimum(lower + 1, len(levels) - 1)
  weight = (position - lower)[..., None]
  yy, xx = np.indices(sigma.shape)
  return (1.0 - weight) * bank[lower, yy, xx] + weight * bank[upper, yy, xx]


def render_scene(rng: np.random.Generator, height: int, width: int):
  """(rgb uint8 HxWx3, depth uint16 HxW in metres*5000, mask uint8 HxW, normals uint8 HxWx3
  as `encode_normals`, defocus uint8 HxWx3)."""
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
  yn, xn = yy / max(height - 1, 1), xx / max(width - 1, 1)
  # Background: wall bending into a floor.
  wall = rng.uniform(3.6, 4.4)
  depth = wall - rng.uniform(0.0, 0.6) * np.clip((yn - 0.6) / 0.4, 0, 1) ** 2
  bg = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.8))
  shade = 1.0 + rng.uniform(-0.15, 0.15) * (yn - 0.5) + rng.uniform(-0.15, 0.15) * (xn - 0.5)
  rgb = bg[None, None, :] * shade[:, :, None]
  mask = np.zeros((height, width), np.uint8)
  surface = np.zeros((height, width), np.int32)  # which surface each pixel shows (0: wall)

  objects = []
  for _ in range(int(rng.integers(2, 6))):
    cls = int(rng.integers(1, NUM_CLASSES))
    if cls in COLOUR_CLASSES:
      d = rng.uniform(1.0, 3.0)
    else:
      d = _DEPTH_LEVELS[cls] + rng.normal(0.0, 0.08)
    objects.append((d, cls))
  # Geometry and appearance drawn after the classes, identically for every class.
  params = []
  for d, cls in objects:
    params.append(dict(
        d=d, cls=cls, ellipse=bool(rng.integers(2)),
        cy=rng.uniform(0, height), cx=rng.uniform(0, width),
        ry=max(rng.uniform(0.1, 0.28) * height, 1.5), rx=max(rng.uniform(0.1, 0.28) * width, 1.5),
        hue=_HUES[cls] + rng.uniform(-12, 12), sat=rng.uniform(0.55, 0.9),
        val=rng.uniform(0.5, 0.95), slant=rng.uniform(-0.15, 0.15, size=2),
        grad=rng.uniform(-0.2, 0.2, size=2)))
  for k, p in enumerate(sorted(params, key=lambda q: -q['d'])):  # far to near
    dy, dx = (yy - p['cy']) / p['ry'], (xx - p['cx']) / p['rx']
    inside = (dy ** 2 + dx ** 2 <= 1.0) if p['ellipse'] else (
        (np.abs(dy) <= 1.0) & (np.abs(dx) <= 1.0))
    obj_depth = p['d'] + p['slant'][0] * dy * p['ry'] / height + p['slant'][1] * dx * p['rx'] / width
    obj_shade = 1.0 + p['grad'][0] * dy + p['grad'][1] * dx
    colour = _hsv_to_rgb(p['hue'], p['sat'], p['val'])
    depth = np.where(inside, obj_depth, depth)
    rgb = np.where(inside[:, :, None], colour[None, None, :] * obj_shade[:, :, None], rgb)
    mask[inside] = p['cls']
    surface[inside] = k + 1

  # Normals from the noise-free depth; none within one pixel of another surface.
  padded = np.pad(surface, 1, mode='edge')
  smooth = np.ones((height, width), bool)
  for dy in range(3):
    for dx in range(3):
      smooth &= padded[dy: dy + height, dx: dx + width] == surface
  normals = encode_normals(camera_normals(depth, FOCAL_IN_WIDTHS * width), smooth)

  rgb = rgb + rng.normal(0.0, 12.0, size=rgb.shape)
  blurred = defocus(rgb, BLUR_PX_PER_METRE * np.maximum(depth - FOCUS_METRES, 0.0))
  depth = depth + rng.normal(0.0, 0.03, size=depth.shape)
  # Ignore ~25% of the boundary pixels (labels are uncertain there, as in real annotations).
  edge = np.zeros_like(mask, bool)
  edge[1:, :] |= mask[1:, :] != mask[:-1, :]
  edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
  mask = np.where(edge & (rng.random(mask.shape) < 0.25), IGNORE_LABEL, mask).astype(np.uint8)
  rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
  blurred = np.clip(np.round(blurred), 0, 255).astype(np.uint8)
  depth = np.clip(np.round(depth * DEPTH_UNITS_PER_METRE), 0, 65535).astype(np.uint16)
  return rgb, depth, mask, normals, blurred


def example(split: str, index: int, height: int, width: int) -> dict:
  """Example `index` of `split`: a pure function of (SEED, split, index, size)."""
  rng = np.random.default_rng([SEED, _SPLIT_CODES[split], index, height, width])
  rgb, depth, mask, normals, blurred = render_scene(rng, height, width)
  return {'rgb': rgb, 'depth': depth, 'mask': mask, 'normals': normals, 'defocus': blurred,
          'name': f'{split}/{index:06d}'}


def _png_bytes(rgb: np.ndarray) -> bytes:
  return preprocess.png_bytes(rgb)


class Builder(tfds.core.GeneratorBasedBuilder):
  """Synthetic RGB-D scenes (colour-only and depth-only classes)."""

  # This file's folder, where TFDS looks for metadata: TFDS would derive it from the module
  # name, cen_jax.datasets.<name>, which is not a folder in an editable checkout (data/<name>).
  pkg_dir_path = tfds.core.Path(os.path.dirname(os.path.abspath(__file__)))

  VERSION = tfds.core.Version('1.2.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'Surface normals (multitask targets); other features unchanged.',
                   '1.2.0': 'Defocus image (multitask input); other features unchanged.'}
  BUILDER_CONFIGS = [
      SyntheticScenesConfig(name='default', description='64x64, 1000 train / 200 test'),
      SyntheticScenesConfig(name='small', height=32, width=32, num_train=200, num_test=50,
                            description='32x32, 200 train / 50 test'),
      SyntheticScenesConfig(name='tiny', height=16, width=20, num_train=8, num_test=6,
                            description='16x20, 8 train / 6 test (smoke tests)'),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'default'

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'rgb': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            'depth': tfds.features.Tensor(shape=(None, None), dtype=np.uint16, encoding='zlib'),
            'mask': tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding='zlib'),
            'normals': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            'defocus': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            'name': tfds.features.Text(),
        }),
        supervised_keys=None,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {'train': self._generate_examples('train', c.num_train),
            'test': self._generate_examples('test', c.num_test)}

  def _generate_examples(self, split, count):
    c = self.builder_config
    for index in range(count):
      ex = example(split, index, c.height, c.width)
      ex['normals'] = _png_bytes(ex['normals'])
      ex['defocus'] = _png_bytes(ex['defocus'])
      ex['rgb'] = _png_bytes(ex['rgb'])  # encoded here: TFDS needs TensorFlow to encode arrays
      yield index, ex
