"""Bad segmentation data fails the prepare with one line naming the file; nothing is written."""

import os

import numpy as np
from PIL import Image

from tests import data_fixtures as fx
from tests.test_data_builders import make_config
from tests.test_end_to_end import ROOT, one_error_line, run_main


def test_label_outside_the_classes_is_one_line_naming_the_mask(tmp_path):
  fx.write_manual_dir(tmp_path / 'manual', num_train=3, num_test=2)
  bad = tmp_path / 'manual' / 'masks' / '000002.png'
  mask = np.asarray(Image.open(bad)).copy()
  mask[3, 5] = 41  # NYUDv2 has 40 classes (0..39); 255 is the ignore label
  Image.fromarray(mask).save(bad)
  config_file = os.path.join(ROOT, 'configs', 'nyudv2_cen_r50.py')
  proc = run_main(f'--config={config_file}', '--mode=prepare',
                  f'--config.data.manual_dir={tmp_path / "manual"}',
                  data_dir=str(tmp_path / 'tfds'), check=False)
  line = one_error_line(proc)
  assert str(bad) in line and 'label 41 at row 3, column 5' in line
  assert proc.returncode == 2
  assert not os.listdir(tmp_path / 'tfds')  # nothing half-written


def test_rgb_and_depth_of_different_sizes_name_the_depth_file(tmp_path):
  fx.write_manual_dir(tmp_path / 'manual', num_train=3, num_test=2, input_hw=(18, 22))
  bad = tmp_path / 'manual' / 'depth' / '000004.png'
  Image.fromarray(np.zeros((18, 24), np.uint16)).save(bad)
  config = make_config(tmp_path, manual_dir=tmp_path / 'manual')
  from cen_jax import input_pipeline as ip
  from data import rgbd_files
  try:
    ip.prepare(config)
  except rgbd_files.DatasetFileError as e:
    message = str(e)
  else:
    raise AssertionError('prepare accepted a depth image of another size')
  assert '\n' not in message and message.startswith(str(bad))
  assert 'depth is 18x24' in message and '18x22' in message
  assert not os.path.exists(ip.prepared_dir(config))
