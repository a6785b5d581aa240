"""NYUDv2 (40 classes) RGB-D semantic segmentation, in the layout of the official CEN code.

Splits: `train` (795 images, from train.txt) and `test` (654 images, from test.txt; the official
CEN repository calls this list `val.txt`, which is accepted when test.txt is absent). There is no
separate validation split: the official code selects checkpoints on the test list.

Features: `rgb` uint8 HxWx3 (PNG), `depth` uint16 HxW raw PNG values (zlib tensor; the pipeline
multiplies them by config.data.depth_scale = 1/5000), `mask` uint8 HxW (zlib tensor, 255 =
ignore), `name` (the rgb path relative to the manual dir). Images keep their own size; inputs
larger than the mask are centre-cropped to it, each on its own, when read (official
CropAlignToMask), so rgb and depth may differ in size. Only an input smaller than its mask is
refused, in one line naming it (the official crop would fail on it).
Examples keep list order (index i of a split is line i of its list).

BuilderConfigs: 'default' (the above) and 'multitask' (config.data.builder_config =
'multitask'; the dense multitask scenarios, cen_jax/tasks/dense.py), which adds `normals` uint8
HxWx3 from user-supplied files <manual_dir>/normals/<rgb file stem>.png: 8-bit RGB PNGs of
the size of the rgb image holding round(127 n + 128) per component of the unit normal in camera
coordinates (x right, y down, z forward), (0, 0, 0) where there is none. The depth target of
the depth task is the stored depth (x config.data.depth_target_scale).
"""

import dataclasses
import os

import tensorflow_datasets as tfds

from cen_jax import preprocess


NUM_CLASSES = 40
IGNORE_LABEL = 255
ALIGN_TO_MASK = 'crop'  # official CropAlignToMask for nyudv2
SPLIT_SIZES = {'train': 795, 'test': 654}

_INSTRUCTIONS = """\
Put the NYUDv2 files of the official CEN / Light-Weight-RefineNet release in the manual dir
(config.data.manual_dir, or `--manual_dir` of `tfds build`):
  <manual_dir>/rgb/000003.png ...     8-bit RGB images
  <manual_dir>/depth/000003.png ...   single-channel 16-bit depth PNGs (the CEN Google-Drive depth)
  <manual_dir>/masks/000003.png ...   8-bit label PNGs, values 0..39, 255 = ignore
  <manual_dir>/train.txt              795 lines
  <manual_dir>/test.txt               654 lines (the official file is named val.txt; either name works)
Each list line holds three TAB-separated paths relative to the manual dir, in the order rgb, mask,
depth, e.g. `rgb/000003.png<TAB>masks/000003.png<TAB>depth/000003.png`. The official lists are in
yikaiw/CEN: semantic_segmentation/data/nyudv2/{train,val}.txt; the images are linked from its README.
"""


@dataclasses.dataclass(eq=False)
class NyuConfig(tfds.core.BuilderConfig):
  normals_dir: str = ''  # '' = no normals; else the manual-dir folder of the normals PNGs


class Builder(tfds.core.GeneratorBasedBuilder):
  """NYUDv2 40-class RGB-D segmentation (official CEN layout)."""

  # This file's folder, where TFDS looks for metadata: TFDS would derive it from the module
  # name, cen_jax.datasets.<name>, which is not a folder in an editable checkout (data/<name>).
  pkg_dir_path = tfds.core.Path(os.path.dirname(os.path.abspath(__file__)))

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  BUILDER_CONFIGS = [
      NyuConfig(name='default', description='rgb, depth, 40-class mask'),
      NyuConfig(name='multitask', normals_dir='normals',
                description='also surface normals from <manual_dir>/normals/<stem>.png'),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = 'default'

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=preprocess.features(tfds, normals=bool(self.builder_config.normals_dir)),
        supervised_keys=None,
        homepage='https://cs.nyu.edu/~fergus/datasets/nyu_depth_v2.html',
        disable_shuffling=True,  # keep list order
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    preprocess.check_manual_dir(manual_dir, _INSTRUCTIONS)
    return {split: self._generate_examples(manual_dir, preprocess.find_list(manual_dir, split))
            for split in ('train', 'test')}

  def _generate_examples(self, manual_dir, list_path):
    yield from preprocess.generate_examples(
        manual_dir, list_path, num_classes=NUM_CLASSES,
        check=preprocess.check_not_smaller_than_mask,
        normals_dir=self.builder_config.normals_dir)
