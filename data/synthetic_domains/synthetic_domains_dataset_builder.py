"""Synthetic multi-domain scenes: a deterministic, download-free translation dataset in which
neither input domain alone determines the RGB target.

Each scene is a lit background wall with 2..4 objects (rectangles or ellipses, painted far to
near), rendered into Taskonomy-named domains, every one stored as an 8-bit 3-channel image
(single-channel domains tiled to 3, as the official reader does):

  rgb             the target: albedo x (0.15 + 0.85 x shading), plus a little noise
  reshading       Lambertian shading n . l of the scene's surfaces under a light whose direction
                  is drawn per scene: geometry and lighting, but no colour at all
  edge_texture    edges of the albedo pattern: object outlines and the dark lines between each
                  object's stripes, whose ORIENTATION encodes the object's colour (one of
                  PALETTE: horizontal / vertical / diagonal / anti-diagonal stripes): colour,
                  but no lighting
  depth_zbuffer   depth (near = dark), 8-bit
  normal          surface normals mapped to [0, 255]

So `reshading` alone cannot tell the four colours apart (they have the same shading), and
`edge_texture` alone cannot tell how bright a surface is lit (the light direction is random and
the surfaces are slanted and curved); together they determine the RGB image up to the noise.
tests/test_translation_data.py checks this with per-pixel least squares on local features.

Generation is a pure function of (SEED, split, index, size). BuilderConfigs: 'default' 64x64 with
1000 train / 200 test; 'small' 32x32 with 200 / 50; 'tiny' 32x32 with 8 / 4 (smoke tests; the
PatchGAN discriminator needs at least 32x32).
"""

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from cen_jax import preprocess

DOMAINS = ('rgb', 'reshading', 'edge_texture', 'depth_zbuffer', 'normal')
SEED = 20201206
# Object colours (RGB in [0, 1]) and the stripe direction (dy, dx) that encodes each.
PALETTE = ((0.85, 0.2, 0.15), (0.2, 0.7, 0.25), (0.2, 0.35, 0.85), (0.9, 0.8, 0.2))
STRIPE_DIRECTIONS = ((1.0, 0.0), (0.0, 1.0), (0.7071, 0.7071), (0.7071, -0.7071))
BACKGROUND = (0.6, 0.6, 0.6)
_SPLIT_CODES = {'train': 0, 'test': 1}


@dataclasses.dataclass(eq=False)
class SyntheticDomainsConfig(tfds.core.BuilderConfig):
  size: int = 64
  num_train: int = 1000
  num_test: int = 200


def _normalise(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _edges(image: np.ndarray) -> np.ndarray:
  """Where a [H, W] label image changes between 4-neighbours (both sides marked)."""
  edge = np.zeros(image.shape, bool)
  dy = image[1:, :] != image[:-1, :]
  dx = image[:, 1:] != image[:, :-1]
  edge[1:, :] |= dy
  edge[:-1, :] |= dy
  edge[:, 1:] |= dx
  edge[:, :-1] |= dx
  return edge


def render_scene(rng: np.random.Generator, size: int) -> dict:
  """{domain: uint8 [size, size, 3]} of one scene."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  u, v = xx / (size - 1) - 0.5, yy / (size - 1) - 0.5
  # Background wall: slightly tilted plane.
  tilt = rng.uniform(-0.4, 0.4, size=2)
  depth = 4.0 + tilt[0] * u + tilt[1] * v
  normal = np.broadcast_to(_normalise(np.array([-tilt[0], -tilt[1], 1.0])),
                           (size, size, 3)).copy()
  albedo = np.broadcast_to(np.array(BACKGROUND), (size, size, 3)).copy()
  region = np.zeros((size, size), np.int32)  # 0 background, k object k
  stripes = np.zeros((size, size), np.int32)  # stripe index inside objects

  objects = []
  for k in range(int(rng.integers(2, 5))):
    objects.append(dict(
        colour=int(rng.integers(len(PALETTE))), ellipse=bool(rng.integers(2)),
        cy=rng.uniform(0.15, 0.85) * size, cx=rng.uniform(0.15, 0.85) * size,
        ry=rng.uniform(0.12, 0.3) * size, rx=rng.uniform(0.12, 0.3) * size,
        d=rng.uniform(1.0, 3.5), bulge=rng.uniform(0.3, 1.0), slant=rng.uniform(-0.6, 0.6, 2),
        period=rng.uniform(4.0, 6.0), phase=rng.uniform(0, 6.0), label=k + 1))
  for o in sorted(objects, key=lambda q: -q['d']):  # far to near
    dy, dx = (yy - o['cy']) / o['ry'], (xx - o['cx']) / o['rx']
    r2 = dy ** 2 + dx ** 2
    inside = (r2 <= 1.0) if o['ellipse'] else ((np.abs(dy) <= 1.0) & (np.abs(dx) <= 1.0))
    # A slanted, bulging surface: height h(dy, dx); normal from its gradient.
    height = o['bulge'] * np.clip(1.0 - 0.7 * r2, 0.0, None) + o['slant'][0] * dy + \
        o['slant'][1] * dx
    gy = (-1.4 * o['bulge'] * dy * (r2 <= 1.0 / 0.7) + o['slant'][0]) / o['ry'] * 4.0
    gx = (-1.4 * o['bulge'] * dx * (r2 <= 1.0 / 0.7) + o['slant'][1]) / o['rx'] * 4.0
    n = _normalise(np.stack([-gx, -gy, np.ones_like(gx)], axis=-1))
    sy, sx = STRIPE_DIRECTIONS[o['colour']]
    index = np.floor((sy * yy + sx * xx + o['phase']) / o['period']).astype(np.int32)
    depth = np.where(inside, o['d'] - 0.2 * height, depth)
    normal = np.where(inside[..., None], n, normal)
    albedo = np.where(inside[..., None], np.array(PALETTE[o['colour']]), albedo)
    region = np.where(inside, o['label'], region)
    stripes = np.where(inside, index, stripes)

  light = _normalise(np.array([rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5), 1.0]))
  shading = np.clip(normal @ light, 0.0, 1.0)
  stripe_lines = _edges(np.where(region > 0, region * 1000 + stripes, 0)) & \
      ~_edges(region) & (region > 0)
  albedo = albedo * np.where(stripe_lines, 0.6, 1.0)[..., None]  # dark lines between stripes
  rgb = albedo * (0.15 + 0.85 * shading[..., None]) + rng.normal(0.0, 0.01, (size, size, 3))
  texture = _edges(region) | stripe_lines

  def grey(x):
    return np.repeat(np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)[..., None], 3, -1)

  return {
      'rgb': np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8),
      'reshading': grey(shading),
      'edge_texture': grey(texture.astype(np.float64)),
      'depth_zbuffer': grey((depth - 0.8) / 4.0),
      'normal': np.clip(np.round((normal + 1.0) * 127.5), 0, 255).astype(np.uint8),
  }


def example(split: str, index: int, size: int) -> dict:
  """Example `index` of `split`: a pure function of (SEED, split, index, size)."""
  rng = np.random.default_rng([SEED, _SPLIT_CODES[split], index, size])
  out = render_scene(rng, size)
  out['name'] = f'{split}/{index:06d}'
  return out


def _png_bytes(image: np.ndarray) -> bytes:
  return preprocess.png_bytes(image)


class Builder(tfds.core.GeneratorBasedBuilder):
  """Synthetic multi-domain scenes (rgb = albedo x shading; colour only in the texture)."""

  # This file's folder, where TFDS looks for metadata: TFDS would derive it from the module
  # name, cen_jax.datasets.<name>, which is not a folder in an editable checkout (data/<name>).
  pkg_dir_path = tfds.core.Path(os.path.dirname(os.path.abspath(__file__)))

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      SyntheticDomainsConfig(name='default', description='64x64, 1000 train / 200 test'),
      SyntheticDomainsConfig(name='small', size=32, num_train=200, num_test=50,
                             description='32x32, 200 train / 50 test'),
      SyntheticDomainsConfig(name='tiny', size=32, num_train=8, num_test=4,
                             description='32x32, 8 train / 4 test (smoke tests)'),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'default'

  def _info(self) -> tfds.core.DatasetInfo:
    features = {d: tfds.features.Image(shape=(None, None, 3), dtype=np.uint8) for d in DOMAINS}
    features['name'] = tfds.features.Text()
    return self.dataset_info_from_configs(
        description=__doc__, features=tfds.features.FeaturesDict(features),
        supervised_keys=None, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {'train': self._generate_examples('train', c.num_train),
            'test': self._generate_examples('test', c.num_test)}

  def _generate_examples(self, split, count):
    for index in range(count):
      ex = example(split, index, self.builder_config.size)
      for d in DOMAINS:  # encoded here: TFDS needs TensorFlow to encode arrays
        ex[d] = _png_bytes(ex[d])
      yield index, ex
