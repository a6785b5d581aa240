"""Bad segmentation data fails the prepare with one line naming the file; nothing is written."""

import os

import numpy as np
import pytest
from PIL import Image

from cen_jax import transforms
from tests.helpers import data_fixtures as fx
from tests.unit.test_data_builders import make_config
from tests.e2e.test_end_to_end import ROOT, one_error_line, run_main


def test_label_outside_the_classes_is_one_line_naming_the_mask(tmp_path):
  fx.write_manual_dir(tmp_path / 'manual', num_train=3, num_test=2)
  bad = tmp_path / 'manual' / 'masks' / '000002.png'
  mask = np.asarray(Image.open(bad)).copy()
  mask[3, 5] = 41  # NYUDv2 has 40 classes (0..39); 255 is the ignore label
  Image.fromarray(mask).save(bad)
  config_file = os.path.join(ROOT, 'configs', 'nyudv2_cen.py') + ':50'
  proc = run_main(f'--config={config_file}', '--mode=prepare',
                  f'--config.data.manual_dir={tmp_path / "manual"}',
                  data_dir=str(tmp_path / 'tfds'), check=False)
  line = one_error_line(proc)
  assert str(bad) in line and 'label 41 at row 3, column 5' in line
  assert proc.returncode == 2
  assert not os.listdir(tmp_path / 'tfds')  # nothing half-written


def prepare_nyudv2(tmp_path, **layout):
  """`main.py --mode prepare` of NYUDv2 on a generated manual dir; (process, config, arrays)."""
  arrays, _ = fx.write_manual_dir(tmp_path / 'manual', num_train=3, num_test=2, **layout)
  config_file = os.path.join(ROOT, 'configs', 'nyudv2_cen.py') + ':50'
  proc = run_main(f'--config={config_file}', '--mode=prepare',
                  f'--config.data.manual_dir={tmp_path / "manual"}',
                  data_dir=str(tmp_path / 'tfds'), check=False)
  return proc, make_config(tmp_path, manual_dir=tmp_path / 'manual'), arrays


def test_depth_larger_than_rgb_larger_than_mask_is_prepared_and_cropped_on_its_own(tmp_path):
  # The official CropAlignToMask centre-crops each input to the mask on its own; an odd
  # excess row or column is cut at the bottom or right.
  proc, config, arrays = prepare_nyudv2(tmp_path, mask_hw=(16, 20), input_hw=(18, 22),
                                        depth_hw=(19, 25))
  assert proc.returncode == 0, proc.stderr[-3000:]
  from cen_jax import input_pipeline as ip
  source = ip._Source(ip.prepared_dir(config), 'train')
  for i, (rgb, depth, mask) in enumerate(list(arrays.values())[:3]):
    raw = source[i]
    np.testing.assert_array_equal(raw['depth'], depth)  # stored at its own size
    aligned = transforms.align_to_mask(transforms.read_inputs(raw, ('rgb', 'depth')), 'crop')
    np.testing.assert_array_equal(aligned['rgb'], rgb[1:17, 1:21])  # excess 2 x 2
    np.testing.assert_array_equal(aligned['depth'][..., 0], depth[1:17, 2:22])  # 3 x 5
    np.testing.assert_array_equal(aligned['mask'], mask)


@pytest.mark.parametrize('depth_hw, input_hw, bad', [
    ((15, 25), (18, 22), 'depth'),  # depth shorter than the mask, rgb larger
    ((19, 25), (16, 19), 'rgb'),  # rgb narrower than the mask, depth larger
])
def test_an_input_smaller_than_the_mask_is_one_line_naming_it(tmp_path, depth_hw, input_hw,
                                                             bad):
  proc, _, _ = prepare_nyudv2(tmp_path, mask_hw=(16, 20), input_hw=input_hw, depth_hw=depth_hw)
  line = one_error_line(proc)
  h, w = depth_hw if bad == 'depth' else input_hw
  assert str(tmp_path / 'manual' / bad / '000001.png') in line
  assert f'{bad} is {h}x{w}, smaller than its mask' in line and '16x20' in line
  assert proc.returncode == 2
  assert not os.listdir(tmp_path / 'tfds')  # nothing half-written


def test_sunrgbd_resizes_each_input_to_the_mask_whatever_its_size(tmp_path):
  # ResizeAlignToMask on non-square inputs of different sizes (the official asserts squares;
  # cen-jax resizes to the mask's height and width, which for squares is the same).
  arrays, _ = fx.write_manual_dir(tmp_path / 'manual', num_train=2, num_test=1,
                                  mask_hw=(12, 16), input_hw=(15, 19), depth_hw=(24, 32),
                                  num_classes=37)
  config = make_config(tmp_path, name='sunrgbd', manual_dir=tmp_path / 'manual')
  from cen_jax import input_pipeline as ip
  ip.prepare(config)
  import cv2
  raw = ip._Source(ip.prepared_dir(config), 'train')[0]
  rgb, depth, mask = list(arrays.values())[0]
  aligned = transforms.align_to_mask(transforms.read_inputs(raw, ('rgb', 'depth')), 'resize')
  np.testing.assert_array_equal(aligned['rgb'],
                                cv2.resize(rgb, (16, 12), interpolation=cv2.INTER_CUBIC))
  # Nearest from 24x32 to 12x16 is every second row and column.
  np.testing.assert_array_equal(aligned['depth'][..., 0], depth[::2, ::2])
  np.testing.assert_array_equal(aligned['mask'], mask)
