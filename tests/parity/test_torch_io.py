"""PyTorch checkpoint import/export (cen_jax.torch_io) and file inference (cen_jax/tasks/segmentation_predict.py).

Tests that need torch call `_torch()` (pytest.importorskip), so the Python 3.12 suite runs the
numpy-only ones and skips the rest; CI runs this file again in a Python 3.11 venv with torch.
The torch reference model (tests/torch_reference.py) follows the official CEN / AsymFusion code.
"""

import collections
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cen_jax import config as config_lib
from cen_jax import torch_io, viz
from cen_jax.tasks import segmentation_predict as predict
from cen_jax.layers import resize
from cen_jax.models import build_model
from tests.helpers.tiny import tiny_config

THRESHOLD = 2e-2
PARITY_SIZE = (61, 83)  # odd and non-square: exercises every padding/rounding rule
TINY = {'blocks': (1, 1, 2, 1), 'stem_width': 8, 'widths': (4, 8, 8, 8),
        'decoder_widths': (8, 8), 'num_classes': 5}


def _torch():
  torch = pytest.importorskip('torch')
  torch.set_num_threads(min(2, os.cpu_count() or 1))
  return torch


def _reference():
  _torch()
  from tests.helpers import torch_reference
  return torch_reference


def _config(resnet=50, fusion='cen', num_classes=40, modalities=('rgb', 'depth'), tiny=False):
  config = config_lib.base_config()
  config.modalities = tuple(modalities)
  m = config.model
  m.resnet, m.fusion, m.num_classes, m.threshold = resnet, fusion, num_classes, THRESHOLD
  if tiny:
    for key, value in TINY.items():
      m[key] = value
  return config


def _template(config):
  """Variable shapes only (jax.ShapeDtypeStruct): no initialiser runs."""
  model = build_model(config)
  x = jnp.zeros((len(config.modalities), 1, 32, 32, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init({'params': jax.random.key(0)}, x, train=False))


def _random_variables(template, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape).astype(s.dtype), template)


def _zero_variables(template):
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)


def _leaves(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_trees_identical(a, b):
  la, lb = _leaves(a), _leaves(b)
  assert list(la) == list(lb)
  for key in la:
    x, y = np.ascontiguousarray(la[key]), np.ascontiguousarray(lb[key])
    assert x.dtype == y.dtype and x.shape == y.shape, key
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), key  # bitwise


def _one_line_error(fn, *args) -> str:
  with pytest.raises(ValueError) as info:
    fn(*args)
  message = str(info.value)
  assert message and '\n' not in message, message
  return message


# ----------------------------------------------------------------------------- parity

def _torch_logits(torch, net, x):
  """x: [M, 1, H, W, 3] numpy -> ([M, 1, h, w, K] branches, [1, h, w, K] ensemble, alpha)."""
  with torch.no_grad():
    outs, alpha = net([torch.from_numpy(np.ascontiguousarray(xm.transpose(0, 3, 1, 2)))
                       for xm in x])
  outs = [o.numpy().transpose(0, 2, 3, 1) for o in outs]
  return np.stack(outs[:-1]), outs[-1], alpha.numpy()


def _flax_outputs(config, state_dict, x):
  variables = torch_io.import_cen_checkpoint(state_dict, _template(config))
  model = build_model(config)
  return jax.device_get(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x))


def _relative_error(flax_logits, torch_logits, scale):
  return float(np.max(np.abs(flax_logits - torch_logits))) / scale


@pytest.mark.parametrize('depth,fusion', [(50, 'cen'), (101, 'cen'), (50, 'asymfusion')])
def test_parity_with_torch_reference(depth, fusion):
  torch, ref = _torch(), _reference()
  torch.manual_seed(depth)
  net = ref.RefineNet(ref.BLOCKS[depth], 2, 40, fusion=fusion, threshold=THRESHOLD)
  ref.randomize_(net, THRESHOLD, seed=depth).eval()
  exchanged = sum(int((m.weight.abs() < THRESHOLD).sum()) for name, m in net.named_modules()
                  if '.bn2.' in name and isinstance(m, torch.nn.BatchNorm2d))
  assert exchanged > 0
  x = np.random.default_rng(depth).standard_normal((2, 1) + PARITY_SIZE + (3,)).astype(np.float32)
  branches, ensemble, alpha = _torch_logits(torch, net, x)
  # DataParallel names, as in the official checkpoints.
  state_dict = {'module.' + k: v.numpy() for k, v in net.state_dict().items()}

  out = _flax_outputs(_config(depth, fusion), state_dict, x)
  scale = float(np.max(np.abs(branches)))
  assert out['branches'].shape == branches.shape == (2, 1, 16, 21, 40)
  errors = [_relative_error(out['branches'][m], branches[m], scale) for m in range(2)]
  errors.append(_relative_error(out['ensemble'], ensemble, scale))
  print(f'R{depth} {fusion}: max|diff| / max|logit| per branch and ensemble: {errors}')
  assert max(errors) <= 1e-4, errors
  np.testing.assert_allclose(out['alpha'], alpha, rtol=1e-6)
  if depth == 50:  # the fusion really acts: without it the same weights give other logits
    plain = _flax_outputs(_config(depth, 'none'), state_dict, x)
    assert _relative_error(plain['branches'], branches, scale) > 1e-2


# ----------------------------------------------------------------------------- export / import

@pytest.mark.parametrize('modalities', [('rgb', 'depth'), ('rgb', 'depth', 'hha')])
def test_round_trip_is_bitwise_exact(modalities):
  template = _template(_config(modalities=modalities, tiny=True))
  variables = _random_variables(template, seed=len(modalities))
  exported = torch_io.export_cen_state_dict(variables)
  assert all(k.startswith('module.') for k in exported)
  counters = [v for k, v in exported.items() if k.endswith('num_batches_tracked')]
  assert counters and all(v.dtype == np.int64 and v.shape == () and v == 0 for v in counters)
  _assert_trees_identical(torch_io.import_cen_checkpoint(exported, template), variables)
  # Without the DataParallel prefix, and again through a second export.
  bare = {k[len('module.'):]: v for k, v in exported.items()}
  again = torch_io.import_cen_checkpoint(bare, template)
  _assert_trees_identical(again, variables)
  second = torch_io.export_cen_state_dict(again)
  assert list(second) == list(exported)
  assert all(np.array_equal(second[k], exported[k]) for k in exported)


def test_export_shapes_follow_torch_layout():
  variables = _random_variables(_template(_config(tiny=True)))
  exported = torch_io.export_cen_state_dict(variables)
  kernel = variables['params']['encoder']['layer1_0']['conv2']['kernel']  # [3, 3, I, O]
  np.testing.assert_array_equal(exported['module.layer1.0.conv2.module.weight'],
                                kernel.transpose(3, 2, 0, 1))
  scale = variables['params']['encoder']['layer2_0']['downsample_bn']['scale']
  np.testing.assert_array_equal(exported['module.layer2.0.downsample.1.bn_1.weight'], scale[1])
  var = variables['batch_stats']['encoder']['bn1']['var']
  np.testing.assert_array_equal(exported['module.bn1.bn_0.running_var'], var[0])
  bias = variables['params']['adapt_stage2_b']['1_conv']['bias']
  np.testing.assert_array_equal(exported['module.adapt_stage2_b.0.1_conv.module.bias'], bias)
  np.testing.assert_array_equal(exported['module.alpha'], variables['params']['alpha'])


@pytest.mark.parametrize('name,fusion,depth', [('tiny', 'cen', None), ('tiny3', 'cen', None),
                                              ('r50', 'asymfusion', 50), ('r101', 'cen', 101)])
def test_export_matches_torch_reference_state_dict(name, fusion, depth):
  torch, ref = _torch(), _reference()
  modalities = ('rgb', 'depth', 'hha') if name == 'tiny3' else ('rgb', 'depth')
  config = _config(depth or 50, fusion, modalities=modalities, tiny=depth is None)
  m = config.model
  if depth is None:
    net = ref.RefineNet(m.blocks, len(modalities), m.num_classes, fusion, THRESHOLD,
                        m.stem_width, m.widths, m.decoder_widths)
  else:
    net = ref.RefineNet(ref.BLOCKS[depth], 2, m.num_classes, fusion, THRESHOLD)
  variables = _random_variables(_template(config), seed=3)
  exported = torch_io.export_cen_state_dict(variables)
  reference = net.state_dict()
  assert list(exported) == ['module.' + k for k in reference]  # same keys, same order
  for key, value in reference.items():
    assert exported['module.' + key].shape == tuple(value.shape), key
  # A strict load into the reference model succeeds and holds exactly the exported values.
  net.load_state_dict({k[len('module.'):]: torch.from_numpy(np.array(v))
                       for k, v in exported.items()}, strict=True)
  for key, value in net.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), exported['module.' + key])


def test_save_and_load_torch_checkpoint(tmp_path):
  torch = _torch()
  template = _template(_config(tiny=True))
  variables = _random_variables(template, seed=5)
  path = str(tmp_path / 'model.pth.tar')
  torch_io.save_torch_checkpoint(path, variables)
  raw = torch.load(path, map_location='cpu', weights_only=True)
  assert list(raw) == ['segmenter']
  assert list(raw['segmenter']) == list(torch_io.export_cen_state_dict(variables))
  assert raw['segmenter']['module.bn1.bn_0.num_batches_tracked'].dtype == torch.int64
  _assert_trees_identical(torch_io.import_cen_checkpoint(torch_io.load_state_dict(path),
                                                         template), variables)


def test_load_official_checkpoint_format_and_convert_to_npz(tmp_path):
  torch = _torch()
  template = _template(_config(tiny=True))
  variables = _random_variables(template, seed=6)
  state = collections.OrderedDict(
      (k, torch.from_numpy(np.array(v)))
      for k, v in torch_io.export_cen_state_dict(variables).items())
  # As the official Saver writes it: best_val is a numpy scalar, which weights_only refuses
  # unless it is allowed explicitly.
  pth = str(tmp_path / 'model-best.pth.tar')
  torch.save({'segmenter': state, 'epoch_start': 7, 'best_val': np.float64(0.4)}, pth)
  loaded = torch_io.load_state_dict(pth)
  assert list(loaded) == list(state)
  assert all(isinstance(v, np.ndarray) for v in loaded.values())
  npz = str(tmp_path / 'model.npz')
  torch_io.convert_pth_to_npz(pth, npz)
  from_npz = torch_io.load_state_dict(npz)
  assert sorted(from_npz) == sorted(loaded)
  assert all(np.array_equal(from_npz[k], loaded[k]) for k in loaded)
  _assert_trees_identical(torch_io.import_cen_checkpoint(from_npz, template), variables)


# ----------------------------------------------------------------------------- torchvision

def _torchvision_resnet(blocks, stem=64, widths=(64, 128, 256, 512), seed=0):
  """A torchvision-named ResNet state_dict with random values, and for every key the Flax
  variable that must receive it: {key: (collection, path, kind)}."""
  rng = np.random.default_rng(seed)
  state, targets = {}, {}

  def conv(key, path, cout, cin, k):
    state[key] = rng.standard_normal((cout, cin, k, k)).astype(np.float32)
    targets[key] = ('params', ('encoder',) + path + ('kernel',), 'conv')

  def bn(key, path, c):
    for name, leaf, collection in (('weight', 'scale', 'params'), ('bias', 'bias', 'params'),
                                   ('running_mean', 'mean', 'batch_stats'),
                                   ('running_var', 'var', 'batch_stats')):
      state[f'{key}.{name}'] = rng.uniform(0.5, 1.5, c).astype(np.float32)
      targets[f'{key}.{name}'] = (collection, ('encoder',) + path + (leaf,), 'bn')
    state[f'{key}.num_batches_tracked'] = np.array(100, np.int64)

  conv('conv1.weight', ('conv1',), stem, 3, 7)
  bn('bn1', ('bn1',), stem)
  inplanes = stem
  for s, (num, planes) in enumerate(zip(blocks, widths), start=1):
    for i in range(num):
      key, block = f'layer{s}.{i}', (f'layer{s}_{i}',)
      conv(f'{key}.conv1.weight', block + ('conv1',), planes, inplanes if i == 0 else planes * 4, 1)
      bn(f'{key}.bn1', block + ('bn1',), planes)
      conv(f'{key}.conv2.weight', block + ('conv2',), planes, planes, 3)
      bn(f'{key}.bn2', block + ('bn2',), planes)
      conv(f'{key}.conv3.weight', block + ('conv3',), planes * 4, planes, 1)
      bn(f'{key}.bn3', block + ('bn3',), planes * 4)
      if i == 0:
        conv(f'{key}.downsample.0.weight', block + ('downsample_conv',), planes * 4, inplanes, 1)
        bn(f'{key}.downsample.1', block + ('downsample_bn',), planes * 4)
    inplanes = widths[s - 1] * 4
  state['fc.weight'] = rng.standard_normal((1000, inplanes)).astype(np.float32)
  state['fc.bias'] = rng.standard_normal(1000).astype(np.float32)
  return state, targets


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return np.asarray(tree)


def test_import_torchvision_resnet50():
  template = _template(_config(50))
  before = _random_variables(template, seed=1)
  state, targets = _torchvision_resnet((3, 4, 6, 3))
  after = torch_io.import_torchvision_resnet(state, before)
  assert len(targets) == len(_leaves(before['params']['encoder'])) + len(
      _leaves(before['batch_stats']['encoder']))  # every encoder leaf has a source
  for key, (collection, path, kind) in targets.items():
    leaf = _get(after[collection], path)
    if kind == 'conv':
      np.testing.assert_array_equal(leaf, state[key].transpose(2, 3, 1, 0))
    else:  # every branch's private BN is a copy of the ImageNet BN
      assert leaf.shape == (2,) + state[key].shape
      for m in range(2):
        np.testing.assert_array_equal(leaf[m], state[key])
  for name in before['params']:  # the decoder is untouched
    if name != 'encoder':
      _assert_trees_identical(after['params'][name], before['params'][name])


def test_import_torchvision_rejects_wrong_files():
  variables = _zero_variables(_template(_config(50)))
  resnet101, _ = _torchvision_resnet((3, 4, 23, 3))
  message = _one_line_error(torch_io.import_torchvision_resnet, resnet101, variables)
  assert message.startswith("checkpoint key 'layer3.6.conv1.weight' is not in the model")
  cen = torch_io.export_cen_state_dict(variables)
  message = _one_line_error(torch_io.import_torchvision_resnet, cen, variables)
  assert "'module.alpha'" in message and '--mode=import' in message


# ----------------------------------------------------------------------------- wrong files

def test_wrong_depth_fails_in_one_line():
  r50, r101 = _template(_config(50)), _template(_config(101))
  from_r50 = torch_io.export_cen_state_dict(_zero_variables(r50))
  from_r101 = torch_io.export_cen_state_dict(_zero_variables(r101))
  assert _one_line_error(torch_io.import_cen_checkpoint, from_r50, r101).startswith(
      "checkpoint lacks key 'module.layer3.6.conv1.module.weight' (shape (256, 1024, 1, 1))")
  assert _one_line_error(torch_io.import_cen_checkpoint, from_r101, r50).startswith(
      "checkpoint key 'module.layer3.6.conv1.module.weight' is not in the model")


def test_wrong_number_of_modalities_fails_in_one_line():
  two = _template(_config(50, modalities=('rgb', 'depth')))
  three = _template(_config(50, modalities=('rgb', 'depth', 'hha')))
  from_three = torch_io.export_cen_state_dict(_zero_variables(three))
  message = _one_line_error(torch_io.import_cen_checkpoint, from_three, two)
  assert message.startswith("checkpoint key 'module.alpha' has shape (3,) but the model "
                            "expects (2,)"), message
  del from_three['module.alpha']
  message = _one_line_error(torch_io.import_cen_checkpoint, from_three, two)
  assert message.startswith("checkpoint key 'module.bn1.bn_2.weight' is not in the model")


def test_wrong_number_of_classes_fails_in_one_line():
  model40 = _template(_config(50, num_classes=40))
  from37 = torch_io.export_cen_state_dict(_zero_variables(_template(_config(50, num_classes=37))))
  message = _one_line_error(torch_io.import_cen_checkpoint, from37, model40)
  assert message.startswith("checkpoint key 'module.clf_conv.module.weight' has shape "
                            "(37, 256, 3, 3) but the model expects (40, 256, 3, 3)"), message


def test_torchvision_file_as_cen_checkpoint_fails_in_one_line():
  state, _ = _torchvision_resnet((3, 4, 6, 3))
  message = _one_line_error(torch_io.import_cen_checkpoint, state, _template(_config(50)))
  assert message.startswith("checkpoint key 'conv1.weight' is not in the model")
  assert 'init_from' in message


def test_non_checkpoint_npz_fails_in_one_line(tmp_path):
  path = tmp_path / 'junk.npz'
  path.write_bytes(os.urandom(256))
  assert str(path) in _one_line_error(torch_io.load_state_dict, str(path))
  with pytest.raises(FileNotFoundError):
    torch_io.load_state_dict(str(tmp_path / 'missing.npz'))


def test_non_checkpoint_pth_fails_in_one_line(tmp_path):
  torch = _torch()
  junk = tmp_path / 'junk.pth'
  junk.write_bytes(os.urandom(1024))
  message = _one_line_error(torch_io.load_state_dict, str(junk))
  assert message.startswith(f'{junk}: not a PyTorch checkpoint'), message
  tensor = str(tmp_path / 'tensor.pth')
  torch.save(torch.zeros(3), tensor)
  assert _one_line_error(torch_io.load_state_dict, tensor).startswith(f'{tensor}: not a checkpoint')
  text = str(tmp_path / 'dict.pth')
  torch.save({'segmenter': {'a': 'not an array'}}, text)
  assert _one_line_error(torch_io.load_state_dict, text).startswith(f'{text}: not a state_dict')


# ----------------------------------------------------------------------------- predict

def _write_pair(rgb_dir, depth_dir, stem, size, seed):
  rng = np.random.default_rng(seed)
  rgb = rng.integers(0, 256, size + (3,), dtype=np.uint8)
  depth = rng.integers(0, 60000, size, dtype=np.uint16)  # > 255: needs a real 16-bit read
  os.makedirs(rgb_dir, exist_ok=True)
  os.makedirs(depth_dir, exist_ok=True)
  Image.fromarray(rgb).save(os.path.join(rgb_dir, f'{stem}.png'))
  Image.fromarray(depth).save(os.path.join(depth_dir, f'{stem}.png'))
  return rgb, depth


def _direct_outputs(config, variables, rgb, depth):
  """Normalised exactly as the dataset (written out here, not taken from the pipeline)."""
  d = config.data
  x_rgb = (rgb / 255.0 - np.asarray(d.rgb_mean)) / np.asarray(d.rgb_std)
  x_depth = np.repeat(depth[:, :, None].astype(np.float64) * d.depth_scale, 3, axis=2)
  x = np.stack([x_rgb, x_depth]).astype(np.float32)[:, None]
  out = jax.jit(functools.partial(build_model(config).apply, train=False))(variables, x)
  mask = jnp.argmax(resize(out['ensemble'], rgb.shape[:2], 'bicubic'), axis=-1)[0]
  return jax.device_get(out), np.asarray(mask)


def _plausible_leaf(path, shape, rng):
  """A random leaf with sensible magnitudes (cheaper than running the initialisers)."""
  name = str(getattr(path[-1], 'key', path[-1]))
  if name == 'kernel':
    return rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
  if name in ('scale', 'var'):
    return rng.uniform(0.5, 1.5, shape)
  return 0.1 * rng.standard_normal(shape)  # biases, means, alpha


def _tiny_predict_setup():
  config = tiny_config()
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, s: _plausible_leaf(path, s.shape, rng).astype(np.float32), _template(config))
  return config, variables


def test_predict_files_writes_masks_and_exact_logits(tmp_path):
  config, variables = _tiny_predict_setup()
  rgb, depth = _write_pair(tmp_path / 'rgb', tmp_path / 'depth', 'scene', (37, 46), seed=1)
  out_dir = str(tmp_path / 'out')
  written = predict.predict_files(config, variables, [str(tmp_path / 'rgb' / 'scene.png'),
                                                      str(tmp_path / 'depth' / 'scene.png')],
                                  out_dir, save_logits=True)
  names = sorted(os.path.basename(p) for p in written)
  assert names == ['scene_depth.npy', 'scene_ensemble.npy', 'scene_mask.png',
                   'scene_overlay.png', 'scene_rgb.npy']
  assert all(os.path.isfile(p) for p in written)
  direct, mask = _direct_outputs(config, variables, rgb, depth)
  for m, name in enumerate(('rgb', 'depth')):
    saved = np.load(os.path.join(out_dir, f'scene_{name}.npy'))
    assert saved.dtype == np.float32 and saved.shape == (10, 12, 5)  # stride 4: ceil(ceil(x/2)/2)
    np.testing.assert_allclose(saved, direct['branches'][m, 0], rtol=1e-5, atol=1e-6)
  ensemble = np.load(os.path.join(out_dir, 'scene_ensemble.npy'))
  np.testing.assert_allclose(ensemble, direct['ensemble'][0], rtol=1e-5, atol=1e-6)
  mask_png = np.asarray(Image.open(os.path.join(out_dir, 'scene_mask.png')).convert('RGB'))
  overlay_png = np.asarray(Image.open(os.path.join(out_dir, 'scene_overlay.png')).convert('RGB'))
  assert mask_png.shape == overlay_png.shape == (37, 46, 3)
  agreement = np.mean(np.all(mask_png == viz.colorize(mask), axis=-1))
  assert agreement > 0.99, agreement
  assert not np.array_equal(overlay_png, mask_png)


def test_predict_folder_matches_stems(tmp_path):
  config, variables = _tiny_predict_setup()
  rgb_dir, depth_dir = str(tmp_path / 'rgb'), str(tmp_path / 'depth')
  _write_pair(rgb_dir, depth_dir, 'a', (33, 41), seed=2)
  _write_pair(rgb_dir, depth_dir, 'b', (20, 24), seed=3)
  out_dir = str(tmp_path / 'out')
  written = predict.predict_folder(config, variables, [rgb_dir, depth_dir], out_dir)
  assert sorted(os.path.basename(p) for p in written) == [
      'a_mask.png', 'a_overlay.png', 'b_mask.png', 'b_overlay.png']
  assert Image.open(os.path.join(out_dir, 'b_mask.png')).size == (24, 20)
  os.remove(os.path.join(depth_dir, 'b.png'))
  message = _one_line_error(predict.predict_folder, config, variables, [rgb_dir, depth_dir],
                            out_dir)
  assert "'b'" in message and depth_dir in message
