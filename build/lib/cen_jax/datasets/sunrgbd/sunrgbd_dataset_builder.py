"""SUN RGB-D (37 classes) RGB-D semantic segmentation, in the list layout of the official CEN code.

Splits: `train` (5,285 images, from train.txt) and `test` (5,050 images, from test.txt, or
val.txt when test.txt is absent). The official CEN code ships no SUN lists or config, only hooks
that this builder and `cen_jax.input_pipeline` reproduce:
  * inputs are resized to the mask's size (ResizeAlignToMask: rgb cubic, depth nearest), not
    centre-cropped (ALIGN_TO_MASK = 'resize'), each input on its own, so rgb and depth may
    differ in size. The official transform asserts that the mask and every input are square
    and scales by mask height / input height; here each input is resized to the mask's exact
    height and width, which is the same for square images and also takes non-square ones;
  * depth option `depth_scale = -2`: per-image min-max stretch of depth to [0, 255] (set
    config.data.depth_scale = -2 for SUN to follow the official hook);
  * mask-index fallback: if the mask named in a list does not exist and its file name ends in a
    6-digit number, the file whose number is 5050 larger is read instead (e.g. a train list may
    name masks/000001.png for the mask stored as masks/005051.png).

Features: `rgb` uint8 HxWx3, `depth` uint16 HxW raw PNG values (zlib tensor), `mask` uint8 HxW
(zlib tensor, 255 = ignore), `name` (rgb path relative to the manual dir). List order is kept.
"""

import os

import tensorflow_datasets as tfds

from cen_jax import preprocess


NUM_CLASSES = 37
IGNORE_LABEL = 255
ALIGN_TO_MASK = 'resize'  # official ResizeAlignToMask for every dataset other than nyudv2
SPLIT_SIZES = {'train': 5285, 'test': 5050}

_INSTRUCTIONS = """\
Put SUN RGB-D (37-class labels) in the manual dir (config.data.manual_dir, or `--manual_dir` of
`tfds build`) in the same layout as the official CEN NYUDv2 data:
  <manual_dir>/rgb/<n>.png|.jpg ...   8-bit RGB images
  <manual_dir>/depth/<n>.png ...      single-channel 16-bit depth PNGs (raw SUN RGB-D depth)
  <manual_dir>/masks/<n>.png ...      8-bit label PNGs, values 0..36, 255 = ignore
  <manual_dir>/train.txt              5,285 lines
  <manual_dir>/test.txt               5,050 lines (val.txt is accepted instead)
Each list line holds three TAB-separated paths relative to the manual dir, in the order rgb, mask,
depth, e.g. `rgb/000001.png<TAB>masks/000001.png<TAB>depth/000001.png`. Numbering with 6 digits
(000001..010335, test images first) is recommended: a mask missing under the listed number is
looked up under number + 5050, as the official code does.
"""


class Builder(tfds.core.GeneratorBasedBuilder):
  """SUN RGB-D 37-class RGB-D segmentation (official CEN list layout)."""

  # This file's folder, where TFDS looks for metadata: TFDS would derive it from the module
  # name, cen_jax.datasets.<name>, which is not a folder in an editable checkout (data/<name>).
  pkg_dir_path = tfds.core.Path(os.path.dirname(os.path.abspath(__file__)))

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=preprocess.features(tfds),
        supervised_keys=None,
        homepage='https://rgbd.cs.princeton.edu/',
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    preprocess.check_manual_dir(manual_dir, _INSTRUCTIONS)
    return {split: self._generate_examples(manual_dir, preprocess.find_list(manual_dir, split))
            for split in ('train', 'test')}

  def _generate_examples(self, manual_dir, list_path):
    yield from preprocess.generate_examples(manual_dir, list_path, num_classes=NUM_CLASSES,
                                            mask_fallback=True)
