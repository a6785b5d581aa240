"""Tiny datasets in the official CEN manual layout, written by the data tests."""

import os

import numpy as np
from PIL import Image


def save_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def make_example(rng, mask_hw, input_hw=None, num_classes=40, depth_hw=None):
  """rgb uint8, depth uint16 (with values > 255), mask uint8 (with some 255); depth has the
  rgb's size unless `depth_hw` is given."""
  input_hw = input_hw or mask_hw
  rgb = rng.integers(0, 256, size=input_hw + (3,), dtype=np.uint8)
  depth = rng.integers(0, 65536, size=depth_hw or input_hw, dtype=np.uint16)
  depth[0, 0] = 65535
  mask = rng.integers(0, num_classes, size=mask_hw, dtype=np.uint8)
  mask[0, :3] = 255
  return rgb, depth, mask


def write_manual_dir(root, *, num_train=5, num_test=3, mask_hw=(16, 20), input_hw=None,
                     test_list='test.txt', seed=0, num_classes=40, odd_shapes=(),
                     mask_offset=0, depth_hw=None):
  """Writes rgb/, depth/, masks/ and the two lists. `odd_shapes`: example numbers whose mask
  (and inputs) are 2 rows taller. `mask_offset`: masks stored under number + offset (SUN).
  `depth_hw`: depth size when it differs from the rgb's (not with `odd_shapes`)."""
  rng = np.random.default_rng(seed)
  arrays = {}
  lines = {'train': [], 'test': []}
  number = 1
  for split, count in (('train', num_train), ('test', num_test)):
    for _ in range(count):
      mhw, ihw = mask_hw, input_hw
      if number in odd_shapes:
        mhw = (mask_hw[0] + 2, mask_hw[1])
        ihw = None if input_hw is None else (input_hw[0] + 2, input_hw[1])
      rgb, depth, mask = make_example(rng, mhw, ihw, num_classes, depth_hw)
      name = f'{number:06d}.png'
      save_png(os.path.join(root, 'rgb', name), rgb)
      save_png(os.path.join(root, 'depth', name), depth)
      save_png(os.path.join(root, 'masks', f'{number + mask_offset:06d}.png'), mask)
      lines[split].append(f'rgb/{name}\tmasks/{name}\tdepth/{name}')
      arrays[f'rgb/{name}'] = (rgb, depth, mask)
      number += 1
  for split, list_name in (('train', 'train.txt'), ('test', test_list)):
    with open(os.path.join(root, list_name), 'w') as f:
      f.write('\n'.join(lines[split]) + '\n')
  return arrays, lines


def train_iterator(config, **kwargs):
  """input_pipeline.train_iterator with the config's task's training samples (as the runner)."""
  from cen_jax import input_pipeline, tasks
  return input_pipeline.train_iterator(config, tasks.get(config).train_sample(config), **kwargs)


def eval_iterator(config, split, **kwargs):
  """input_pipeline.eval_iterator with the config's task's eval samples (as runtime.evaluate)."""
  from cen_jax import input_pipeline, tasks
  task = tasks.get(config)
  return input_pipeline.eval_iterator(config, split, task.eval_sample(config),
                                      one_shape=task.ONE_EVAL_SHAPE, **kwargs)
