"""cen_jax.input_pipeline: official augmentation invariants, train/eval iterators, sharding."""

import json
import sys

import cv2
import numpy as np
import pytest

from cen_jax import config as config_lib
from cen_jax import input_pipeline as ip
from cen_jax import transforms
from tests.helpers import data_fixtures as fx

PAD = (123, 116, 103)  # official Pad values after np.pad's cast to uint8/uint16
AUG = dict(align='crop', crop_size=24, shorter_side=12, low_scale=0.5, high_scale=2.0,
           ignore_label=255)


# ------------------------------------------------------------------------------------------------
# Augmentation (pure numpy/cv2).


def block_example(h=30, w=40, num_classes=6, seed=0, block=5):
  """Mask of block x block squares; rgb and depth are functions of the mask (depth tiled)."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, num_classes, size=(-(-h // block), -(-w // block)))
  mask = np.kron(blocks, np.ones((block, block), int))[:h, :w].astype(np.uint8)
  rgb_lut = rng.integers(0, 256, size=(num_classes, 3), dtype=np.uint8)
  depth_lut = (1000 + 977 * np.arange(num_classes)).astype(np.uint16)
  depth = np.repeat(depth_lut[mask][:, :, None], 3, axis=2)
  return {'rgb': rgb_lut[mask], 'depth': depth, 'mask': mask}, rgb_lut, depth_lut


def interior(mask, radius):
  """Pixels whose (2r+1)^2 neighbourhood lies inside the array and has a single label."""
  h, w = mask.shape
  padded = np.pad(mask.astype(int), radius, constant_values=-1)
  same = np.ones_like(mask, bool)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      same &= padded[dy:dy + h, dx:dx + w] == mask
  return same


@pytest.mark.parametrize('seed', range(12))
def test_augment_keeps_inputs_and_mask_aligned(seed):
  example, rgb_lut, depth_lut = block_example(60, 80, num_classes=3, seed=seed, block=15)
  out = transforms.augment(example, rng=np.random.default_rng(seed),
                   **dict(AUG, shorter_side=40, crop_size=40))
  mask, depth, rgb = out['mask'], out['depth'], out['rgb']
  assert mask.shape == (40, 40) and rgb.shape == depth.shape == (40, 40, 3)
  assert rgb.dtype == np.uint8 and depth.dtype == np.uint16
  real = mask != 255
  # Nearest-resized depth: exactly the mask's function everywhere, pad values elsewhere.
  np.testing.assert_array_equal(depth[real], np.repeat(depth_lut[mask[real]][:, None], 3, 1))
  np.testing.assert_array_equal(depth[~real], np.broadcast_to(PAD, (int((~real).sum()), 3)))
  # Cubic-resized rgb: exact away from label edges (cubic reproduces constants; its support is
  # +-2 source pixels, i.e. up to 4 output pixels at scale 2).
  core = interior(mask, 4) & real
  assert core.sum() > 5
  diff = np.abs(rgb[core].astype(int) - rgb_lut[mask[core]].astype(int))
  assert diff.max() <= 1


def test_augment_mirror_and_crop_positions_match_reference():
  """Scale > needed, no pad: the output is a window of the cv2-resized (and maybe flipped) input."""
  example, _, _ = block_example(40, 50)
  flips = set()
  for seed in range(10):
    rng = np.random.default_rng(seed)
    out = transforms.augment(example, rng=np.random.default_rng(seed), **AUG)
    scale = rng.uniform(0.5, 2.0)
    scale = max(scale, 12 / 40)
    flip = bool(rng.integers(2))
    mask = cv2.resize(example['mask'], None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    rgb = cv2.resize(example['rgb'], None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    h, w = mask.shape
    pad_h, pad_w = max((24 - h + 1) // 2, 0), max((24 - w + 1) // 2, 0)
    mask = np.pad(mask, ((pad_h, pad_h), (pad_w, pad_w)), constant_values=255)
    rgb = np.stack([np.pad(rgb[..., c], ((pad_h, pad_h), (pad_w, pad_w)),
                           constant_values=PAD[c]) for c in range(3)], 2)
    if flip:
      mask, rgb = mask[:, ::-1], rgb[:, ::-1]
    top = rng.integers(0, mask.shape[0] - 24 + 1)
    left = rng.integers(0, mask.shape[1] - 24 + 1)
    np.testing.assert_array_equal(out['mask'], mask[top:top + 24, left:left + 24])
    np.testing.assert_array_equal(out['rgb'], rgb[top:top + 24, left:left + 24])
    flips.add(flip)
  assert flips == {False, True}


def test_shorter_side_rule_and_padding():
  example, _, _ = block_example(20, 30)
  aug = dict(AUG, crop_size=40, shorter_side=16, low_scale=0.5, high_scale=0.5)
  out = transforms.augment(example, rng=np.random.default_rng(0), **aug)
  real = out['mask'] != 255
  rows, cols = np.flatnonzero(real.any(1)), np.flatnonzero(real.any(0))
  # scale 0.5 would give a shorter side of 10 < 16, so scale = 16/20: 16 x 24 before padding.
  assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (16, 24)
  assert real.sum() == 16 * 24
  # Padded symmetrically to 40 x 40 (12 + 16 + 12, 8 + 24 + 8): the crop is the whole image.
  assert (rows.min(), cols.min()) == (12, 8)
  np.testing.assert_array_equal(out['rgb'][~real], np.broadcast_to(PAD, (int((~real).sum()), 3)))
  # A scale above the bound is kept: 20 * 2 = 40 rows.
  aug = dict(AUG, crop_size=100, shorter_side=16, low_scale=2.0, high_scale=2.0)
  out = transforms.augment(example, rng=np.random.default_rng(0), **aug)
  assert (out['mask'] != 255).sum() == 40 * 60


def test_odd_crop_size_rounds_down_like_random_crop():
  example, _, _ = block_example(30, 40)
  out = transforms.augment(example, rng=np.random.default_rng(0), **dict(AUG, crop_size=25))
  assert out['mask'].shape == (24, 24)


def test_crop_align_to_mask_is_the_official_centre_crop():
  mask = np.zeros((4, 5), np.uint8)
  x = np.arange(7 * 9 * 3).reshape(7, 9, 3)
  out = transforms.align_to_mask({'rgb': x, 'mask': mask}, 'crop')['rgb']
  # Official: h = (7-4)//2 = 1, del_h = 1 -> rows 1:5; w = (9-5)//2 = 2, del_w = 0 -> cols 2:7.
  np.testing.assert_array_equal(out, x[1:5, 2:7])


def test_resize_align_to_mask():
  mask = np.zeros((6, 8), np.uint8)
  depth = np.repeat(np.arange(12 * 16, dtype=np.uint16).reshape(12, 16)[:, :, None], 3, 2)
  rgb = np.full((12, 16, 3), 77, np.uint8)
  out = transforms.align_to_mask({'rgb': rgb, 'depth': depth, 'mask': mask}, 'resize')
  assert out['rgb'].shape == (6, 8, 3) and out['depth'].shape == (6, 8, 3)
  assert (out['rgb'] == 77).all()
  # Nearest: every output depth value is an input value.
  assert np.isin(out['depth'], depth).all()
  np.testing.assert_array_equal(
      out['depth'][..., 0], cv2.resize(depth[..., 0], (8, 6), interpolation=cv2.INTER_NEAREST))


def test_normalise():
  config = config_lib.base_config()
  rgb = np.array([[[0, 128, 255]]], np.uint8)
  depth = np.array([[[5000, 123, 65535]]], np.uint16)
  out = transforms.normalise(config, {'rgb': rgb, 'depth': depth, 'mask': np.array([[3]], np.uint8)})
  mean, std = np.array(config.data.rgb_mean), np.array(config.data.rgb_std)
  np.testing.assert_allclose(out['rgb'][0, 0], (np.array([0, 128, 255]) / 255 - mean) / std,
                             rtol=1e-6)
  np.testing.assert_allclose(out['depth'][0, 0], [1.0, 123 / 5000, 65535 / 5000], rtol=1e-6)
  assert out['rgb'].dtype == out['depth'].dtype == np.float32 and out['mask'].dtype == np.int32
  np.testing.assert_array_equal(transforms.denormalize_rgb(config, out['rgb']), rgb)
  config.data.depth_scale = -2  # official SUN RGB-D option: min-max to [0, 255]
  out = transforms.normalise(config, {'depth': depth, 'mask': np.array([[3]], np.uint8)})
  np.testing.assert_allclose(out['depth'][0, 0], [(5000 - 123) * 255 / (65535 - 123), 0, 255],
                             rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Iterators over a tiny prepared NYUDv2-layout dataset.


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp('tiny')
  # 10 train / 7 test; inputs larger than masks (centre-cropped); test examples 12 and 14 are
  # 2 rows taller, so eval batches must group shapes.
  arrays, lines = fx.write_manual_dir(root / 'manual', num_train=10, num_test=7,
                                      mask_hw=(16, 20), input_hw=(18, 23), odd_shapes=(12, 14))
  config = config_lib.base_config()
  config.data.name = 'nyudv2'
  config.data.data_dir = str(root / 'tfds')
  config.data.manual_dir = str(root / 'manual')
  config.data.crop_size = 24
  config.data.shorter_side = 12
  config.train.batch_size = 4
  ip.prepare(config)
  return config, arrays, lines


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_batches_shapes_and_determinism(tiny):
  config, _, _ = tiny
  it = fx.train_iterator(config, seed=7)
  assert it.steps_per_epoch == 2
  batches = take(it, 5)
  for b in batches:
    assert sorted(b) == ['depth', 'mask', 'rgb']
    assert b['rgb'].shape == b['depth'].shape == (4, 24, 24, 3)
    assert b['rgb'].dtype == b['depth'].dtype == np.float32
    assert b['mask'].shape == (4, 24, 24) and b['mask'].dtype == np.int32
    assert set(np.unique(b['mask'])) <= set(range(40)) | {255}
  assert_batches_equal(batches, take(fx.train_iterator(config, seed=7), 5))
  other = take(fx.train_iterator(config, seed=8), 1)[0]
  assert not np.array_equal(other['rgb'], batches[0]['rgb'])
  assert 'tensorflow' not in sys.modules  # TFDS/grain run without TensorFlow


def test_epochs_are_reshuffled_permutations(tiny):
  config, _, _ = tiny
  element = fx.train_iterator(config, seed=3).element
  epochs = [[element.record(e * 8 + i) for i in range(8)] for e in range(4)]
  for e, records in enumerate(epochs):
    assert all(r[0] == e for r in records)
    indices = [r[1] for r in records]
    assert len(set(indices)) == 8 and set(indices) <= set(range(10))  # remainder dropped
  assert len({tuple(r[1] for r in records) for records in epochs}) > 1


def test_train_state_round_trip_resumes_exactly(tiny):
  config, _, _ = tiny
  it = fx.train_iterator(config, seed=1)
  take(it, 3)
  state = it.get_state()
  state = json.loads(json.dumps(state))  # JSON-serialisable
  expected = take(it, 4)  # crosses an epoch boundary
  fresh = fx.train_iterator(config, seed=1)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 4), expected)
  it.set_state(state)  # rewinding a live iterator
  assert_batches_equal(take(it, 4), expected)
  wrong = fx.train_iterator(config, seed=2)
  with pytest.raises(ValueError, match='seed'):
    wrong.set_state(state)


def test_process_shards_are_disjoint_and_form_the_global_batch(tiny):
  config, _, _ = tiny
  single = take(fx.train_iterator(config, seed=5), 4)
  parts = [fx.train_iterator(config, seed=5, process_index=p, process_count=2) for p in range(2)]
  local = [take(it, 4) for it in parts]
  for step in range(4):
    for key in single[step]:
      np.testing.assert_array_equal(
          np.concatenate([local[0][step][key], local[1][step][key]]), single[step][key])
  for epoch in range(2):
    records = [[parts[p].element.record(epoch * 4 + i)[1] for i in range(4)] for p in range(2)]
    assert not set(records[0]) & set(records[1])
    assert len(set(records[0]) | set(records[1])) == 8
  with pytest.raises(ValueError, match='divisible'):
    fx.train_iterator(config, seed=5, process_index=0, process_count=3)


def test_worker_processes_give_the_same_batches(tiny):
  config, _, _ = tiny
  in_process = take(fx.train_iterator(config, seed=9), 5)
  config = config.copy_and_resolve_references()
  config.data.num_workers = 2
  it = fx.train_iterator(config, seed=9)
  try:
    assert_batches_equal(take(it, 5), in_process)
    state = {'next_batch': 2}
    it.set_state(dict(it.get_state(), **state))
    assert_batches_equal(take(it, 3), in_process[2:])
  finally:
    it.close()


def test_eval_batches_cover_every_example_once(tiny):
  config, arrays, lines = tiny
  n = ip.num_examples(config, 'test')
  assert n == 7
  seen = []
  for process_index in range(2):
    for b in fx.eval_iterator(config, 'test', batch_size=3, process_index=process_index,
                              process_count=2):
      assert b['rgb'].shape[0] == b['depth'].shape[0] == b['mask'].shape[0] == 3
      assert b['rgb'].dtype == np.float32 and b['mask'].dtype == np.int32
      assert b['valid'].dtype == bool
      assert b['mask'].shape[1:] in ((16, 20), (18, 20))
      assert b['rgb'].shape[1:3] == b['mask'].shape[1:]
      assert (b['mask'][~b['valid']] == 255).all()  # padding changes no confusion matrix
      assert (b['index'][~b['valid']] == -1).all()
      for i in np.flatnonzero(b['valid']):
        index = int(b['index'][i])
        seen.append(index)
        rgb, depth, mask = arrays[lines['test'][index].split('\t')[0]]
        np.testing.assert_array_equal(b['mask'][i], mask)
        # Official eval: centre-crop to the mask (18x23 -> 16x20: rows 1:17, cols 1:21).
        h, w = mask.shape
        top, left = (rgb.shape[0] - h) // 2, (rgb.shape[1] - w) // 2
        expected = transforms.normalise(config, {'rgb': rgb[top:top + h, left:left + w],
                                         'mask': mask})['rgb']
        np.testing.assert_array_equal(b['rgb'][i], expected)
        np.testing.assert_allclose(b['depth'][i][..., 1],
                                   depth[top:top + h, left:left + w] / 5000, rtol=1e-6)
  assert sorted(seen) == list(range(n))
  single = [int(i) for b in fx.eval_iterator(config, 'test', batch_size=3)
            for i in b['index'][b['valid']]]
  assert sorted(single) == list(range(n))


def test_eval_batches_group_shapes():
  shapes = [(2, 2), (3, 2), (2, 2), (3, 2), (2, 2), (2, 2)]
  assert ip.eval_batches(shapes, 2) == [[0, 2], [4, 5], [1, 3]]
  assert ip.eval_batches(shapes, 2, 1, 2) == [[4, 5]]


def test_to_display_image(tiny):
  config, _, _ = tiny
  b = next(fx.eval_iterator(config, 'test', batch_size=1))
  for name in ('rgb', 'depth'):
    img = transforms.display_image(config, name, b[name][0])
    assert img.dtype == np.uint8 and img.shape == b[name][0].shape
  assert transforms.display_image(config, 'depth', b['depth'][0]).max() == 255
