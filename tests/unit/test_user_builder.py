"""A dataset builder folder of the user's own (config.data.builder_dir): found by file, with no
edit of sys.path, and prepared and read like the built-in builders; bad names fail in one line."""

import os
import shutil

import numpy as np
import pytest

from cen_jax import input_pipeline as ip
from tests.helpers.configs import tiny_synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_own_builder_folder_prepares_the_same_examples_as_the_built_in(tmp_path):
  folder = tmp_path / 'my_builders'
  folder.mkdir()
  shutil.copy(os.path.join(ROOT, 'data', 'synthetic_scenes', 'synthetic_scenes_dataset_builder.py'),
              folder / 'myscenes_dataset_builder.py')
  builtin = tiny_synthetic.get_config()
  builtin.data.data_dir = str(tmp_path / 'tfds')
  own = tiny_synthetic.get_config()
  own.data.data_dir = str(tmp_path / 'tfds')
  own.data.name = 'myscenes'
  own.data.builder_dir = str(folder)
  assert ip.dataset_module(own).__file__ == str(folder / 'myscenes_dataset_builder.py')
  target = ip.prepare(own)
  assert os.path.basename(os.path.dirname(os.path.dirname(target))) == 'myscenes'
  assert ip.num_examples(own, 'train') == ip.num_examples(builtin, 'train') == 8
  assert ip.num_classes(own) == ip.num_classes(builtin) == 7
  assert ip.align_mode(own) == ip.align_mode(builtin)
  mine = ip._Source(target, 'train')[3]
  theirs = ip._Source(ip.prepare(builtin), 'train')[3]
  for key in ('rgb', 'depth', 'mask'):
    np.testing.assert_array_equal(mine[key], theirs[key])


def test_unknown_names_fail_in_one_line(tmp_path):
  config = tiny_synthetic.get_config()
  config.data.name = 'nosuchscenes'
  with pytest.raises(ValueError, match="name='nosuchscenes': expected one of .*builder_dir"):
    ip.dataset_module(config)
  config.data.builder_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match='nosuchscenes_dataset_builder.py: not found'):
    ip.dataset_module(config)
