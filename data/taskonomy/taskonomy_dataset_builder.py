"""Taskonomy domains for CEN image-to-image translation (official yikaiw/CEN layout, manual).

The official code reads the sample building `taskonomy-sample-model-1` through two list files
whose lines hold one example each, with a `{domain}` placeholder that is replaced by every
domain name:

    {domain}/point_407_view_2_domain_{domain}.png

Each stored example holds every domain of the builder config as an 8-bit [H, W, 3] image, after
the official per-domain preprocessing (cen_jax/preprocess.preprocess_domain: 1-channel
tiled to 3, log(1 + x) for depth, the official maxima of depth and edges, uint8), plus 'name'.
Splits: 'train' (train_domain.txt) and 'val' (val_domain.txt). BuilderConfigs: 'default' (the
official default pair and target: reshading, edge_texture -> rgb) and 'all' (the ten domains);
any set via `TaskonomyConfig(name=..., domains=(...))`. A missing or corrupt file, or domain
images of one example with different sizes, fail the prepare with one line naming the file.
"""

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from cen_jax import preprocess

ALL_DOMAINS = ('rgb', 'normal', 'reshading', 'depth_euclidean', 'depth_zbuffer',
               'principal_curvature', 'edge_occlusion', 'edge_texture', 'segment_unsup2d',
               'segment_unsup25d')
LIST_FILES = {'train': 'train_domain.txt', 'val': 'val_domain.txt'}
TASKONOMY_FILES = True  # raw files need the official per-domain preprocessing (predict)

_INSTRUCTIONS = """\
Put the Taskonomy sample building (taskonomy-sample-model-1, as the official CEN code reads it)
in the manual dir (config.data.manual_dir):
  <manual_dir>/<domain>/point_<X>_view_<Y>_domain_<domain>.png   for every domain of the
      builder config ('default': rgb, reshading, edge_texture; 'all': the ten domains
      rgb normal reshading depth_euclidean depth_zbuffer principal_curvature edge_occlusion
      edge_texture segment_unsup2d segment_unsup25d); depth and edges are 16-bit PNGs
  <manual_dir>/train_domain.txt, <manual_dir>/val_domain.txt   the official lists
      (yikaiw/CEN image2image_translation/data/), one line per example such as
      {domain}/point_407_view_2_domain_{domain}.png
"""


@dataclasses.dataclass(eq=False)
class TaskonomyConfig(tfds.core.BuilderConfig):
  domains: tuple = ('rgb', 'reshading', 'edge_texture')


def _file_error():
  return preprocess.DatasetFileError


def read_list(path: str) -> list[str]:
  """The list's example patterns (each with a {domain} placeholder), blank lines skipped."""
  error = _file_error()
  if not os.path.isfile(path):
    raise error(f'{path}: list file not found')
  with open(path, 'rb') as f:
    lines = [l.decode('utf-8', 'replace').strip() for l in f.read().splitlines()]
  patterns = [l for l in lines if l]
  for number, pattern in enumerate(patterns, 1):
    if '{domain}' not in pattern:
      raise error(f'{path}:{number}: expected a path with a {{domain}} placeholder, got '
                  f'{pattern!r}')
  if not patterns:
    raise error(f'{path}: list file has no examples')
  return patterns


def read_domain(path: str, domain: str) -> np.ndarray:
  """A domain file -> uint8 [H, W, 3] after the official preprocessing (one-line errors)."""
  from PIL import Image
  error = _file_error()
  if not os.path.isfile(path):
    raise error(f'{path}: file not found')
  try:
    with Image.open(path) as image:
      array = np.array(image)
  except Exception as e:  # PIL raises many types for truncated or corrupt files
    raise error(f'{path}: cannot decode image ({type(e).__name__}: {e})') from None
  try:
    return preprocess.preprocess_domain(domain, array)
  except ValueError as e:
    raise error(f'{path}: {e}') from None


def _png_bytes(image: np.ndarray) -> bytes:
  return preprocess.png_bytes(image)


class Builder(tfds.core.GeneratorBasedBuilder):
  """Taskonomy domains (official CEN translation layout and preprocessing)."""

  # This file's folder, where TFDS looks for metadata: TFDS would derive it from the module
  # name, cen_jax.datasets.<name>, which is not a folder in an editable checkout (data/<name>).
  pkg_dir_path = tfds.core.Path(os.path.dirname(os.path.abspath(__file__)))

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  BUILDER_CONFIGS = [
      TaskonomyConfig(name='default', description='reshading, edge_texture and rgb'),
      TaskonomyConfig(name='all', domains=ALL_DOMAINS, description='the ten official domains'),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'default'

  def _info(self) -> tfds.core.DatasetInfo:
    features = {d: tfds.features.Image(shape=(None, None, 3), dtype=np.uint8)
                for d in self.builder_config.domains}
    features['name'] = tfds.features.Text()
    return self.dataset_info_from_configs(
        description=__doc__, features=tfds.features.FeaturesDict(features),
        supervised_keys=None, homepage='http://taskonomy.stanford.edu/',
        disable_shuffling=True)  # keep list order

  def _split_generators(self, dl_manager):
    error = _file_error()
    manual_dir = os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(manual_dir):
      raise error(f'{manual_dir}: manual dir not found')
    for domain in self.builder_config.domains:
      if not os.path.isdir(os.path.join(manual_dir, domain)):
        raise error(f'{os.path.join(manual_dir, domain)}: folder of domain {domain!r} not found '
                    f'(builder config {self.builder_config.name!r} stores '
                    f'{", ".join(self.builder_config.domains)})')
    lists = {split: read_list(os.path.join(manual_dir, name))
             for split, name in LIST_FILES.items()}
    return {split: self._generate_examples(manual_dir, patterns)
            for split, patterns in lists.items()}

  def _generate_examples(self, manual_dir, patterns):
    error = _file_error()
    domains = self.builder_config.domains
    for key, pattern in enumerate(patterns):  # fail fast on a missing file, before decoding
      for domain in domains:
        path = os.path.join(manual_dir, pattern.replace('{domain}', domain))
        if not os.path.isfile(path):
          raise error(f'{path}: file not found (listed as {pattern!r})')
    for key, pattern in enumerate(patterns):
      example, first = {'name': pattern}, None
      for domain in domains:
        path = os.path.join(manual_dir, pattern.replace('{domain}', domain))
        image = read_domain(path, domain)
        if first is None:
          first = (path, image.shape[:2])
        elif image.shape[:2] != first[1]:
          raise error(f'{path}: {domain} is {image.shape[0]}x{image.shape[1]} but '
                      f'{first[0]} is {first[1][0]}x{first[1][1]}')
        example[domain] = _png_bytes(image)
      yield key, example
