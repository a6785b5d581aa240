"""Translation data: the Taskonomy builder on files in the official layout, the official domain
preprocessing, train/eval samples, and the synthetic multi-domain scenes."""

import os

import numpy as np
import pytest
from PIL import Image

from cen_jax import config as config_lib
from cen_jax import input_pipeline as ip
from cen_jax import preprocess
from cen_jax.tasks import translation_data as td
from tests.helpers import data_fixtures as fx

from cen_jax.datasets.synthetic_domains import synthetic_domains_dataset_builder as synth

POINTS = {'train': ['point_407_view_2', 'point_982_view_5', 'point_182_view_3'],
          'val': ['point_11_view_0', 'point_12_view_1']}


def write_taskonomy(root, size=(24, 20), seed=0):
  """rgb (8-bit RGB), reshading (8-bit grey), edge_texture (16-bit) and depth_zbuffer (16-bit,
  with a 65535 'no depth' pixel) in the official layout, and the two official lists."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, points in POINTS.items():
    lines = []
    for point in points:
      files = {'rgb': rng.integers(0, 256, size + (3,), dtype=np.uint8),
               'reshading': rng.integers(0, 256, size, dtype=np.uint8),
               'edge_texture': rng.integers(0, 11356, size, dtype=np.uint16),
               'depth_zbuffer': rng.integers(0, 65536, size, dtype=np.uint16)}
      files['depth_zbuffer'][0, 0] = 65535
      for domain, array in files.items():
        path = os.path.join(root, domain, f'{point}_domain_{domain}.png')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(array).save(path)
        arrays[(point, domain)] = array
      lines.append(f'{{domain}}/{point}_domain_{{domain}}.png')
    with open(os.path.join(root, f'{split}_domain.txt'), 'w') as f:
      f.write('\n'.join(lines) + '\n')
  return arrays


def make_config(tmp_path, *, name='taskonomy', builder_config='', modalities=None):
  config = config_lib.translation_config()
  config.data.name = name
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.manual_dir = str(tmp_path / 'manual')
  config.data.builder_config = builder_config
  if modalities:
    config.modalities = modalities
  config.data.load_size, config.data.crop_size = 36, 32
  config.train.batch_size = 2
  return config


def hand_preprocessed(domain, array):
  """The official dataset.py rules, written out for the test's known inputs."""
  x = array
  if x.ndim == 2:
    x = np.repeat(x[:, :, None], 3, axis=2)
  if domain == 'edge_texture':
    return np.floor(x.astype(np.float64) * 255.0 / 11355.0).astype(np.uint8)
  if domain == 'depth_zbuffer':
    v = np.log(1.0 + x.astype(np.float64)) * 255.0 / 11.1  # int32 in the official (mode 'I')
    return np.floor(v).astype(np.uint8)
  return x


def read_split(config, split):
  src = ip._Source(ip.prepared_dir(config), split)
  return [src[i] for i in range(len(src))]


def test_taskonomy_layout_preprocessing_and_splits(tmp_path):
  arrays = write_taskonomy(tmp_path / 'manual')
  from cen_jax.datasets.taskonomy import taskonomy_dataset_builder as tb
  builder = tb.Builder(data_dir=str(tmp_path / 'tfds'), file_format='array_record',
                       config=tb.TaskonomyConfig(name='depth', domains=(
                           'rgb', 'reshading', 'edge_texture', 'depth_zbuffer')))
  import tensorflow_datasets as tfds
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(tmp_path / 'manual')))
  for split, points in POINTS.items():
    src = builder.as_data_source(split=split)
    assert len(src) == len(points)
    for i, point in enumerate(points):
      example = src[i]
      assert example['name'] == f'{{domain}}/{point}_domain_{{domain}}.png'.encode()
      for domain in ('rgb', 'reshading', 'edge_texture', 'depth_zbuffer'):
        got = np.asarray(example[domain])
        assert got.shape == (24, 20, 3) and got.dtype == np.uint8
        np.testing.assert_array_equal(got, hand_preprocessed(domain, arrays[(point, domain)]),
                                      err_msg=f'{point} {domain}')


def test_preprocess_domain_hand_values():
  edge = np.array([[0, 11355, 5000, 44]], np.uint16)
  np.testing.assert_array_equal(preprocess.preprocess_domain('edge_texture', edge)[..., 0],
                                [[0, 255, 112, 0]])  # 5000 * 255 / 11355 = 112.28
  depth = np.array([[0, 1, 65535, 300]], np.uint16)
  # log(1 + 0) = 0; log(2) * 255 / 11.1 = 15.92; log(65536) * 255 / 11.1 = 254.77 (int32 as
  # the official's Pillow read 16-bit PNGs, no uint16 wrap); log(301) * 255 / 11.1 = 131.1
  np.testing.assert_array_equal(preprocess.preprocess_domain('depth_euclidean', depth)[..., 0],
                                [[0, 15, 254, 131]])
  rgb = np.arange(12, dtype=np.uint8).reshape(1, 4, 3)
  np.testing.assert_array_equal(preprocess.preprocess_domain('rgb', rgb), rgb)
  with pytest.raises(ValueError, match="domain 'normal'"):
    preprocess.preprocess_domain('normal', np.zeros((2, 2, 3), np.uint16))


@pytest.mark.parametrize('problem', ['missing', 'corrupt', 'size', 'domain_folder'])
def test_taskonomy_bad_files_are_one_line_naming_the_file(tmp_path, problem):
  write_taskonomy(tmp_path / 'manual')
  bad = tmp_path / 'manual' / 'edge_texture' / 'point_982_view_5_domain_edge_texture.png'
  if problem == 'missing':
    os.remove(bad)
  elif problem == 'corrupt':
    bad.write_bytes(bad.read_bytes()[:40])
  elif problem == 'size':
    Image.fromarray(np.zeros((24, 22), np.uint16)).save(bad)
  else:
    import shutil
    bad = tmp_path / 'manual' / 'edge_texture'
    shutil.rmtree(bad)
  config = make_config(tmp_path)
  with pytest.raises(preprocess.DatasetFileError) as info:
    ip.prepare(config)
  message = str(info.value)
  assert '\n' not in message and message.startswith(str(bad)), message
  if problem == 'size':
    assert '24x22' in message and '24x20' in message
  assert not os.listdir(tmp_path / 'tfds')  # nothing half-written


def test_train_samples_share_crop_and_flip_across_domains_and_resume_exactly(tmp_path):
  write_taskonomy(tmp_path / 'manual')
  config = make_config(tmp_path, modalities=('reshading', 'rgb'))
  config.data.target = 'edge_texture'
  it = fx.train_iterator(config, seed=3)
  batches = [next(it) for _ in range(3)]
  for b in batches:
    assert set(b) == {'reshading', 'rgb', 'target'}
    for v in b.values():
      assert v.shape == (2, 32, 32, 3) and v.dtype == np.float32
      assert v.min() >= -1.0 and v.max() <= 1.0
  # Same crop and flip for every domain: rebuild one sample by hand from the stored images.
  sample = td.TrainSample(config)
  raw = {'reshading': np.full((24, 20, 3), 7, np.uint8), 'rgb': np.zeros((24, 20, 3), np.uint8),
         'edge_texture': np.zeros((24, 20, 3), np.uint8)}
  ramp = np.arange(24 * 20, dtype=np.float64).reshape(24, 20) % 251
  for key in raw:
    raw[key] = np.repeat(ramp.astype(np.uint8)[:, :, None], 3, axis=2)
  out = sample(raw, np.random.default_rng(0))
  np.testing.assert_array_equal(out['reshading'], out['rgb'])
  np.testing.assert_array_equal(out['reshading'], out['target'])
  rng = np.random.default_rng(0)
  left, top, mirror = (int(rng.integers(0, 5)), int(rng.integers(0, 5)), bool(rng.integers(2)))
  big = td.resize(raw['rgb'], 36)[top:top + 32, left:left + 32]
  expected = td.to_unit_range(big[:, ::-1] if mirror else big)
  np.testing.assert_array_equal(out['rgb'], expected)
  # Resume: a fresh iterator set to batch 2 yields the third batch again.
  state = it.get_state()
  again = fx.train_iterator(config, seed=3)
  again.set_state(dict(state, next_batch=2))
  third = next(again)
  for k in third:
    np.testing.assert_array_equal(third[k], batches[2][k])


def test_eval_batches_resize_to_crop_size_and_pad(tmp_path):
  arrays = write_taskonomy(tmp_path / 'manual')
  config = make_config(tmp_path)
  batches = list(fx.eval_iterator(config, 'val', batch_size=4))
  assert len(batches) == 1
  b = batches[0]
  assert b['valid'].tolist() == [True, True, False, False]
  assert b['index'].tolist() == [0, 1, -1, -1]
  expected = td.to_unit_range(td.resize(arrays[('point_12_view_1', 'rgb')], 32))
  np.testing.assert_array_equal(b['target'][1], expected)
  assert not b['reshading'][2:].any()


def test_unknown_domain_is_one_line(tmp_path):
  write_taskonomy(tmp_path / 'manual')
  config = make_config(tmp_path, modalities=('normal', 'reshading'))
  with pytest.raises(ValueError, match="domain 'normal' is not a feature of the dataset"):
    next(fx.train_iterator(config, seed=0))


def test_synthetic_domains_are_deterministic_and_well_formed():
  a = synth.example('train', 3, 32)
  b = synth.example('train', 3, 32)
  c = synth.example('test', 3, 32)
  for d in synth.DOMAINS:
    assert a[d].shape == (32, 32, 3) and a[d].dtype == np.uint8
    np.testing.assert_array_equal(a[d], b[d])
  assert not np.array_equal(a['rgb'], c['rgb'])


def _fit_error(features, target):
  """Mean |residual| of the least-squares fit of target from features (+ bias)."""
  x = np.concatenate([features, np.ones((len(features), 1))], axis=1)
  coef, *_ = np.linalg.lstsq(x, target, rcond=None)
  return float(np.abs(x @ coef - target).mean())


def test_synthetic_rgb_needs_both_shading_and_texture():
  """Per-pixel least squares of rgb from local features: shading alone misses the colour,
  texture-derived colour alone misses the lighting; their product terms predict it well."""
  feats = {'shade': [], 'colour': [], 'both': []}
  targets = []
  for i in range(40):
    ex = synth.example('train', i, 32)
    shade = ex['reshading'][..., 0].astype(np.float64).ravel() / 255.0
    # The colour an ideal texture reader would infer: the object's palette entry (one-hot).
    rgb = ex['rgb'].reshape(-1, 3).astype(np.float64) / 255.0
    palette = np.asarray(synth.PALETTE + (synth.BACKGROUND,))
    ratio = rgb / np.maximum(rgb.sum(1, keepdims=True), 1e-6)
    pal_ratio = palette / palette.sum(1, keepdims=True)
    onehot = np.eye(len(palette))[np.argmin(((ratio[:, None] - pal_ratio[None]) ** 2).sum(-1),
                                            axis=1)]
    feats['shade'].append(np.stack([shade, shade ** 2], 1))
    feats['colour'].append(onehot)
    feats['both'].append(np.concatenate([onehot, onehot * shade[:, None]], 1))
    targets.append(rgb)
  target = np.concatenate(targets)
  errors = {k: _fit_error(np.concatenate(v), target) for k, v in feats.items()}
  assert errors['both'] < 0.5 * errors['shade'], errors
  assert errors['both'] < 0.5 * errors['colour'], errors


def test_cycle_samples_stack_each_branch_target(tmp_path):
  """Cycle fusion: 'target' holds branch m's target (domain m + 1 mod M) at [m], cropped and
  flipped with the inputs; evaluation likewise."""
  from cen_jax import branches
  config = make_config(tmp_path, modalities=('reshading', 'edge_texture', 'rgb'))
  config.branches = branches.cycle(config.modalities)
  config.data.target = ''
  rng = np.random.default_rng(5)
  raw = {d: rng.integers(0, 256, (24, 20, 3), dtype=np.uint8) for d in config.modalities}
  for out in (td.TrainSample(config)(raw, np.random.default_rng(1)), td.EvalSample(config)(raw)):
    assert out['target'].shape == (3,) + out['rgb'].shape
    for m, domain in enumerate(config.modalities):
      following = config.modalities[(m + 1) % 3]
      np.testing.assert_array_equal(out['target'][m], out[following], err_msg=domain)
  config.data.target = 'rgb'
  from cen_jax.tasks import translation
  with pytest.raises(ValueError, match="set config.data.target to ''"):
    translation.check_config(config)
