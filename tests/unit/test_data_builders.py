"""TFDS builders under data/: layouts, dtypes, errors, atomic preparation, synthetic design."""

import glob
import os

import numpy as np
import pytest

from cen_jax import config as config_lib
from cen_jax import input_pipeline as ip
from tests.helpers import data_fixtures as fx

from cen_jax import preprocess
from cen_jax.datasets.synthetic_scenes import synthetic_scenes_dataset_builder as synth


def make_config(tmp_path, name='nyudv2', manual_dir=None):
  config = config_lib.base_config()
  config.data.name = name
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.manual_dir = str(manual_dir) if manual_dir else ''
  return config


def read_split(config, split):
  src = ip._Source(ip.prepared_dir(config), split)
  return [src[i] for i in range(len(src))]


@pytest.mark.parametrize('test_list', ['test.txt', 'val.txt'])
def test_nyudv2_layout_sizes_dtypes_and_16bit_depth(tmp_path, test_list):
  arrays, lines = fx.write_manual_dir(tmp_path / 'manual', num_train=5, num_test=3,
                                      input_hw=(18, 23), test_list=test_list)
  config = make_config(tmp_path, manual_dir=tmp_path / 'manual')
  ip.prepare(config)
  assert ip.num_examples(config, 'train') == 5
  assert ip.num_examples(config, 'test') == 3
  assert ip.num_classes(config) == 40
  for split in ('train', 'test'):
    examples = read_split(config, split)
    for line, ex in zip(lines[split], examples):  # list order is kept
      rgb_rel = line.split('\t')[0]
      rgb, depth, mask = arrays[rgb_rel]
      name = ex['name'].decode() if isinstance(ex['name'], bytes) else ex['name']
      assert name == rgb_rel
      assert ex['rgb'].dtype == np.uint8 and ex['rgb'].shape == (18, 23, 3)
      assert ex['depth'].dtype == np.uint16 and ex['depth'].shape == (18, 23)
      assert ex['mask'].dtype == np.uint8 and ex['mask'].shape == (16, 20)
      np.testing.assert_array_equal(ex['rgb'], rgb)
      np.testing.assert_array_equal(ex['depth'], depth)  # 16-bit values survive
      assert ex['depth'].max() == 65535
      np.testing.assert_array_equal(ex['mask'], mask)
      assert (ex['mask'] == 255).sum() == 3  # ignore labels kept


def test_prepare_is_idempotent_and_leaves_no_temp_dirs(tmp_path):
  fx.write_manual_dir(tmp_path / 'manual', num_train=2, num_test=2)
  config = make_config(tmp_path, manual_dir=tmp_path / 'manual')
  first = ip.prepare(config)
  stamp = os.path.getmtime(os.path.join(first, 'dataset_info.json'))
  # A later prepare reuses the data even if the manual dir is gone.
  os.rename(tmp_path / 'manual', tmp_path / 'gone')
  assert ip.prepare(config) == first
  assert os.path.getmtime(os.path.join(first, 'dataset_info.json')) == stamp
  assert not glob.glob(str(tmp_path / 'tfds' / '.prepare-*'))


def _one_line_error(excinfo, path):
  message = str(excinfo.value)
  assert '\n' not in message
  assert message.startswith(str(path)), message


def test_missing_file_raises_one_clear_error(tmp_path):
  fx.write_manual_dir(tmp_path / 'manual', num_train=3, num_test=2)
  missing = tmp_path / 'manual' / 'depth' / '000002.png'
  os.remove(missing)
  config = make_config(tmp_path, manual_dir=tmp_path / 'manual')
  with pytest.raises(preprocess.DatasetFileError) as excinfo:
    ip.prepare(config)
  _one_line_error(excinfo, missing)
  assert 'not found' in str(excinfo.value)
  assert not os.path.exists(ip.prepared_dir(config))  # nothing half-written
  assert not os.listdir(tmp_path / 'tfds')


@pytest.mark.parametrize('which', ['rgb', 'masks', 'depth'])
def test_corrupt_file_raises_one_clear_error(tmp_path, which):
  fx.write_manual_dir(tmp_path / 'manual', num_train=3, num_test=2)
  corrupt = tmp_path / 'manual' / which / '000004.png'
  data = corrupt.read_bytes()
  corrupt.write_bytes(data[:len(data) // 2])  # truncated PNG
  config = make_config(tmp_path, manual_dir=tmp_path / 'manual')
  with pytest.raises(preprocess.DatasetFileError) as excinfo:
    ip.prepare(config)
  _one_line_error(excinfo, corrupt)


def test_malformed_list_line_names_the_list(tmp_path):
  fx.write_manual_dir(tmp_path / 'manual', num_train=2, num_test=2)
  with open(tmp_path / 'manual' / 'train.txt', 'a') as f:
    f.write('rgb/000001.png masks/000001.png depth/000001.png\n')  # spaces, not tabs
  config = make_config(tmp_path, manual_dir=tmp_path / 'manual')
  with pytest.raises(preprocess.DatasetFileError, match=r'train\.txt:3: expected 3 tab'):
    ip.prepare(config)


def test_input_smaller_than_mask_is_rejected_for_nyudv2(tmp_path):
  fx.write_manual_dir(tmp_path / 'manual', num_train=2, num_test=1, input_hw=(14, 20))
  config = make_config(tmp_path, manual_dir=tmp_path / 'manual')
  with pytest.raises(preprocess.DatasetFileError, match='smaller than its mask'):
    ip.prepare(config)


def test_failed_reprepare_keeps_previous_dataset(tmp_path):
  arrays, lines = fx.write_manual_dir(tmp_path / 'manual', num_train=3, num_test=2)
  config = make_config(tmp_path, manual_dir=tmp_path / 'manual')
  directory = ip.prepare(config)
  before = read_split(config, 'train')
  # Break the manual data, then force a rebuild: it must fail and keep the old copy.
  (tmp_path / 'manual' / 'rgb' / '000003.png').write_bytes(b'not a png')
  with pytest.raises(preprocess.DatasetFileError):
    ip.prepare(config, force=True)
  assert ip.prepare(config) == directory
  after = read_split(config, 'train')
  assert len(after) == len(before) == 3
  for a, b in zip(before, after):
    for key in ('rgb', 'depth', 'mask'):
      np.testing.assert_array_equal(a[key], b[key])
  assert not glob.glob(str(tmp_path / 'tfds' / '.prepare-*'))
  assert sorted(os.listdir(os.path.dirname(directory))) == ['1.0.0']
  # A successful forced rebuild replaces it.
  fx.write_manual_dir(tmp_path / 'manual', num_train=4, num_test=2, seed=1)
  assert ip.prepare(config, force=True) == directory
  assert ip.num_examples(config, 'train') == 4
  assert sorted(os.listdir(os.path.dirname(directory))) == ['1.0.0']


def test_missing_manual_dir_is_a_clear_error(tmp_path):
  config = make_config(tmp_path, manual_dir=tmp_path / 'nowhere')
  with pytest.raises(preprocess.DatasetFileError, match='nowhere'):
    ip.prepare(config)
  config = make_config(tmp_path)
  with pytest.raises(preprocess.DatasetFileError, match='manual_dir is empty'):
    ip.prepare(config)


def test_sunrgbd_mask_index_fallback(tmp_path):
  arrays, lines = fx.write_manual_dir(tmp_path / 'manual', num_train=3, num_test=2,
                                      mask_hw=(12, 12), input_hw=(20, 20), mask_offset=5050,
                                      num_classes=37)
  assert os.path.isfile(tmp_path / 'manual' / 'masks' / '005051.png')
  assert not os.path.isfile(tmp_path / 'manual' / 'masks' / '000001.png')
  config = make_config(tmp_path, name='sunrgbd', manual_dir=tmp_path / 'manual')
  ip.prepare(config)
  assert ip.num_classes(config) == 37
  assert ip.num_examples(config, 'train') == 3 and ip.num_examples(config, 'test') == 2
  for line, ex in zip(lines['train'], read_split(config, 'train')):
    np.testing.assert_array_equal(ex['mask'], arrays[line.split('\t')[0]][2])
  # Neither the listed mask nor its fallback: one error naming the listed file.
  os.remove(tmp_path / 'manual' / 'masks' / '005052.png')
  config = make_config(tmp_path / 'second', name='sunrgbd', manual_dir=tmp_path / 'manual')
  with pytest.raises(preprocess.DatasetFileError) as excinfo:
    ip.prepare(config)
  _one_line_error(excinfo, tmp_path / 'manual' / 'masks' / '000002.png')
  assert '005052.png' in str(excinfo.value)


def test_sun_fallback_name():
  assert preprocess.sun_mask_fallback('/x/masks/000001.png') == '/x/masks/005051.png'
  assert preprocess.sun_mask_fallback('/x/masks/label.png') is None


def test_synthetic_tiny_is_deterministic_and_well_formed(tmp_path):
  config = make_config(tmp_path, name='synthetic_scenes')
  config.data.builder_config = 'tiny'
  ip.prepare(config)
  assert ip.num_examples(config, 'train') == 8 and ip.num_examples(config, 'test') == 6
  assert ip.num_classes(config) == synth.NUM_CLASSES == 7
  examples = read_split(config, 'train')
  for i, ex in enumerate(examples):
    assert ex['rgb'].shape == (16, 20, 3) and ex['rgb'].dtype == np.uint8
    assert ex['depth'].shape == (16, 20) and ex['depth'].dtype == np.uint16
    assert ex['mask'].shape == (16, 20) and ex['mask'].dtype == np.uint8
    assert set(np.unique(ex['mask'])) <= set(range(7)) | {255}
    assert ex['defocus'].shape == (16, 20, 3) and ex['defocus'].dtype == np.uint8
    again = synth.example('train', i, 16, 20)
    for key in ('rgb', 'depth', 'mask', 'normals', 'defocus'):
      np.testing.assert_array_equal(ex[key], again[key])
  test0 = read_split(config, 'test')[0]
  assert not np.array_equal(test0['rgb'], examples[0]['rgb'])  # splits differ


def test_synthetic_classes_need_both_modalities():
  """Colour-only classes share depth statistics, depth-only classes share colour statistics."""
  depth = {c: [] for c in range(1, 7)}
  rgb = {c: [] for c in range(1, 7)}
  counts = np.zeros(256, int)
  for i in range(600):
    ex = synth.example('train', i, 24, 24)
    counts += np.bincount(ex['mask'].ravel(), minlength=256)
    for c in range(1, 7):
      sel = ex['mask'] == c
      depth[c].append(ex['depth'][sel].astype(np.float64) / synth.DEPTH_UNITS_PER_METRE)
      rgb[c].append(ex['rgb'][sel].astype(np.float64))
  depth = {c: np.concatenate(v) for c, v in depth.items()}
  rgb = {c: np.concatenate(v) for c, v in rgb.items()}
  assert counts[255] > 0 and all(counts[c] > 5000 for c in range(7))

  def quantiles(x):
    return np.quantile(x, [0.1, 0.25, 0.5, 0.75, 0.9], axis=0)

  # Colour-only classes 1-3: same depth distribution, very different colours.
  for a, b in ((1, 2), (1, 3), (2, 3)):
    assert np.abs(quantiles(depth[a]) - quantiles(depth[b])).max() < 0.2
    assert np.abs(rgb[a].mean(0) - rgb[b].mean(0)).max() > 40
  # Depth-only classes 4-6: same colour distribution, depths ~0.75 m apart.
  for a, b in ((4, 5), (4, 6), (5, 6)):
    assert np.abs(quantiles(rgb[a]) - quantiles(rgb[b])).max() < 12
    assert abs(np.median(depth[a]) - np.median(depth[b])) > 0.6
  # Depth alone cannot isolate a colour class: the depth-only levels lie inside its range.
  lo, hi = np.quantile(depth[1], [0.05, 0.95])
  assert all(lo < np.median(depth[c]) < hi for c in (4, 5, 6))


def gaussian_classifier_iou(train, test) -> np.ndarray:
  """Per-class IoU on `test` of a per-pixel Gaussian (QDA) classifier fitted on `train`;
  each is (features [N, F], labels [N])."""
  (x_train, y_train), (x_test, y_test) = train, test
  scores = []
  for c in range(synth.NUM_CLASSES):
    x = x_train[y_train == c]
    cov = np.atleast_2d(np.cov(x.T)) + 1e-6 * np.eye(x.shape[1])
    d = x_test - x.mean(0)
    scores.append(-0.5 * np.einsum('ni,ij,nj->n', d, np.linalg.inv(cov), d)
                  - 0.5 * np.linalg.slogdet(cov)[1] + np.log((y_train == c).mean()))
  pred = np.argmax(np.stack(scores, 1), 1)
  conf = np.zeros((synth.NUM_CLASSES,) * 2)
  np.add.at(conf, (y_test, pred), 1)
  return np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))


def test_synthetic_per_pixel_classifier_needs_both_modalities():
  """A per-pixel Gaussian (QDA) classifier: RGB alone fails on the depth-only classes, depth
  alone on the colour-only classes, both together are nearly perfect."""

  def pixels(split, count):
    xs, ys = [], []
    for i in range(count):
      ex = synth.example(split, i, 32, 32)
      xs.append(np.concatenate([ex['rgb'].reshape(-1, 3) / 255.0,
                                ex['depth'].reshape(-1, 1) / synth.DEPTH_UNITS_PER_METRE], 1))
      ys.append(ex['mask'].ravel())
    x, y = np.concatenate(xs), np.concatenate(ys)
    return x[y != 255], y[y != 255]

  train, test = pixels('train', 200), pixels('test', 100)

  def iou(cols):
    return gaussian_classifier_iou((train[0][:, cols], train[1]), (test[0][:, cols], test[1]))

  rgb, depth, both = iou([0, 1, 2]), iou([3]), iou([0, 1, 2, 3])
  assert rgb[list(synth.COLOUR_CLASSES)].min() > 0.9
  assert rgb[list(synth.DEPTH_CLASSES)].mean() < 0.5
  assert depth[list(synth.DEPTH_CLASSES)].min() > 0.3
  assert depth[list(synth.COLOUR_CLASSES)].mean() < 0.4
  assert both.mean() > 0.95


def test_defocus_is_a_per_pixel_gaussian_blur():
  """Against a hand-built sampled Gaussian (scipy's: truncated at 4 sigma, normalised):
  a constant sigma on the bank blurs the whole image by it, a sigma between two bank levels
  mixes them linearly, sigma 0 keeps the pixel, and each pixel takes its own sigma."""
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 255, size=(21, 24, 2))

  def blur(x, sigma):  # separable correlation with reflected borders ('symmetric')
    radius = int(4.0 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode='symmetric')
    rows = sum(t * padded[k: k + x.shape[0]] for k, t in enumerate(taps))
    return sum(t * rows[:, k: k + x.shape[1]] for k, t in enumerate(taps))

  step = synth.BLUR_SIGMA_STEP
  full = lambda s: np.full(image.shape[:2], s)
  np.testing.assert_allclose(synth.defocus(image, full(0.0)), image, atol=1e-9)
  np.testing.assert_allclose(synth.defocus(image, full(4 * step)), blur(image, 4 * step),
                             atol=1e-9)
  np.testing.assert_allclose(synth.defocus(image, full(2.5 * step)),
                             0.5 * blur(image, 2 * step) + 0.5 * blur(image, 3 * step), atol=1e-9)
  sigma = full(0.0)
  sigma[:, 12:] = 6 * step
  mixed = synth.defocus(image, sigma)
  np.testing.assert_allclose(mixed[:, :12], image[:, :12], atol=1e-9)
  np.testing.assert_allclose(mixed[:, 12:], blur(image, 6 * step)[:, 12:], atol=1e-9)
  with pytest.raises(ValueError, match='sigma must be'):
    synth.defocus(image, full(-0.1))


def test_synthetic_defocus_keeps_the_other_features():
  """The defocus image (1.2.0) draws nothing from the generator: rgb, depth, mask and normals
  are those of 1.1.0 (digest of 3 train and 3 test 64x64 examples, taken with the 1.1.0
  builder at commit 54e3128)."""
  import hashlib
  digest = hashlib.sha256()
  for split in ('train', 'test'):
    for i in range(3):
      ex = synth.example(split, i, 64, 64)
      for key in ('rgb', 'depth', 'mask', 'normals'):
        digest.update(np.ascontiguousarray(ex[key]).tobytes())
  assert digest.hexdigest() == '62a959b97732758dc533f64ccea5a0639c6fe65132c7dc68131b501252e37579'


def test_synthetic_defocus_holds_the_depth_only_classes():
  """A per-pixel Gaussian (QDA) classifier on local colour and local high-frequency energy
  (how much of the noise texture the blur left): from rgb it cannot tell the depth-only
  classes apart, from the defocus image it can, and it keeps the colour classes."""
  from scipy import ndimage

  def features(image):
    x = image.astype(np.float64)
    grey = x.mean(-1)
    high = grey - ndimage.uniform_filter(grey, 3, mode='reflect')
    energy = np.log(ndimage.uniform_filter(high * high, 5, mode='reflect') + 1e-2)
    colour = ndimage.uniform_filter(x, (5, 5, 1), mode='reflect') / 255.0
    return np.concatenate([colour.reshape(-1, 3), energy.reshape(-1, 1)], 1)

  def pixels(split, count, key):
    xs, ys = [], []
    for i in range(count):
      ex = synth.example(split, i, 32, 32)
      xs.append(features(ex[key]))
      ys.append(ex['mask'].ravel())
    x, y = np.concatenate(xs), np.concatenate(ys)
    return x[y != 255], y[y != 255]

  def iou(key):
    return gaussian_classifier_iou(pixels('train', 200, key), pixels('test', 100, key))

  rgb, blurred = iou('rgb'), iou('defocus')
  depth_classes, colour_classes = list(synth.DEPTH_CLASSES), list(synth.COLOUR_CLASSES)
  assert rgb[depth_classes].mean() < 0.25
  assert blurred[depth_classes].mean() > 0.45 and blurred[depth_classes].min() > 0.35
  assert blurred[colour_classes].min() > 0.7


def test_grayscale_and_jpeg_rgb_files(tmp_path):
  from PIL import Image
  arrays, lines = fx.write_manual_dir(tmp_path / 'manual', num_train=2, num_test=1)
  gray = np.arange(16 * 20, dtype=np.uint8).reshape(16, 20)
  fx.save_png(str(tmp_path / 'manual' / 'rgb' / '000001.png'), gray)
  rgb2 = arrays['rgb/000002.png'][0]
  Image.fromarray(rgb2).save(tmp_path / 'manual' / 'rgb' / '000002.jpg', quality=90)
  text = (tmp_path / 'manual' / 'train.txt').read_text().replace('000002.png\tmasks',
                                                                  '000002.jpg\tmasks')
  (tmp_path / 'manual' / 'train.txt').write_text(text)
  config = make_config(tmp_path, manual_dir=tmp_path / 'manual')
  ip.prepare(config)
  first, second = read_split(config, 'train')
  np.testing.assert_array_equal(first['rgb'], np.repeat(gray[:, :, None], 3, 2))  # tiled
  with Image.open(tmp_path / 'manual' / 'rgb' / '000002.jpg') as img:
    np.testing.assert_array_equal(second['rgb'], np.array(img))  # PIL's decoding kept
