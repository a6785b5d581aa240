"""The translation networks (cen_jax/models/pix2pix.py) and their torch checkpoint map.

The first part needs no torch: shapes, the official parameter count, exchange and dropout
semantics, running statistics against a numpy hand computation, data parallel = one device,
the transposed convolution against a direct numpy scatter, the slim penalty. The second part
(pytest.importorskip('torch'); scripts/test.sh runs this file in the torch venv) checks parity
with tests/torch_reference_pix2pix.py (written from the official code) and the checkpoint
round trip.
"""

import copy
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import config as config_lib
from cen_jax import layers, torch_io
from cen_jax.fusion import ops
from cen_jax.models import (build_translation_models, count_params, path_str,
                            translation_exchange_scales)
from cen_jax.models.pix2pix import Discriminator, Generator

THR = 1e-2
OFFICIAL_G_PARAMS = 54_431_633  # M = 2, ngf 64, 256x256 (num_downs 8), official count
# Official InstanceNorm parameters that are never applied (M = 2, ngf 64, 8 levels):
# conv1 2x2x64 + conv8 2x2x512 + deconv8 2x2x3.
UNUSED_G_NORM_PARAMS = 2 * 2 * 64 + 2 * 2 * 512 + 2 * 2 * 3  # 2316
OFFICIAL_D_PARAMS = 2_769_731  # ndf 64, shared by all branches
UNUSED_D_NORM_PARAMS = 2 * 64 + 2 * 1  # conv1 and conv5 'insnorm'


def images(m, n, size, seed=0, channels=3):
  return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, (m, n, size, size, channels))
                     .astype(np.float32))


@functools.lru_cache(maxsize=None)
def g_shapes(m, ngf, num_downs, size):
  gen = Generator(ngf=ngf, num_downs=num_downs)
  x = jnp.zeros((m, 1, size, size, 3))
  return jax.eval_shape(lambda: gen.init({'params': jax.random.key(0)}, x, train=False,
                                         deterministic=True))


def random_variables(shapes, seed=0, low_scales=True):
  """numpy variables: kernels ~ N(0, 0.02) (official init), other params N(0, 0.3), norm
  scales U(0.5, 1.5) with ~1/4 of the channels at 0.001 (below THR: they exchange), running
  mean N(0, 1), running var U(0.5, 2)."""
  rng = np.random.RandomState(seed)

  def make(path, s):
    name = path_str(path).split('/')[-1]
    if name == 'kernel':
      return (rng.randn(*s.shape) * 0.02).astype(s.dtype)
    if name == 'scale':
      v = rng.uniform(0.5, 1.5, s.shape)
      if low_scales:
        v = np.where(rng.uniform(size=s.shape) < 0.25, 1e-3, v)
      return v.astype(s.dtype)
    if name == 'var':
      return rng.uniform(0.5, 2.0, s.shape).astype(s.dtype)
    if name == 'alpha':
      return rng.randn(*s.shape).astype(s.dtype)
    return (rng.randn(*s.shape) * (1.0 if name == 'mean' else 0.3)).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(make, shapes)


@functools.partial(jax.jit, static_argnames=('gen', 'train', 'deterministic'))
def _run_g(gen, variables, x, seed, train, deterministic):
  return gen.apply(variables, x, train=train, deterministic=deterministic,
                   rngs={'dropout': jax.random.key(seed)}, mutable=['batch_stats'])


def run_g(gen, variables, x, train=False, deterministic=True, seed=0):
  """(outputs, {'batch_stats': ...}), compiled (eager Flax is slow on CPU)."""
  return _run_g(gen, variables, x, seed, train=train, deterministic=deterministic)


def init_g(gen, x):
  return jax.jit(lambda x: gen.init({'params': jax.random.key(0)}, x, train=False,
                                    deterministic=True))(x)


# ----------------------------------------------------------------------------- shapes, counts

@pytest.mark.parametrize('size,num_downs', [(32, 5), (64, 6)])
def test_shapes(size, num_downs):
  gen = Generator(ngf=4, num_downs=num_downs)
  x = images(2, 3, size)
  variables = random_variables(g_shapes(2, 4, num_downs, size))
  out, _ = run_g(gen, variables, x, train=True, deterministic=False)
  assert out['branches'].shape == (2, 3, size, size, 3)
  assert out['ensemble'].shape == (3, size, size, 3)
  assert out['alpha'].shape == (2,)
  assert out['branches'].dtype == jnp.float32
  assert float(jnp.abs(out['branches']).max()) <= 1.0  # tanh
  np.testing.assert_allclose(np.asarray(out['alpha']),
                             jax.nn.softmax(jnp.asarray(variables['params']['alpha'])))
  widths = [variables['params'][f'conv{k}']['conv']['kernel'].shape[-1]
            for k in range(1, num_downs + 1)]
  assert widths == [4 * min(2 ** k, 8) for k in range(num_downs)]
  dis = Discriminator(ndf=4)
  dv = random_variables(jax.eval_shape(lambda: dis.init(jax.random.key(1), x, x, train=False)))
  apply_d = jax.jit(functools.partial(dis.apply, train=False))
  logits = apply_d(dv, x, out['branches'])
  assert logits.shape == (2, 3, size // 8 - 2, size // 8 - 2, 1)
  # One target batch for every branch (the official D(x, real)) = that target stacked.
  real = images(1, 3, size, seed=5)[0]
  np.testing.assert_array_equal(apply_d(dv, x, real), apply_d(dv, x, jnp.stack([real, real])))


def test_official_parameter_counts():
  config = config_lib.translation_config()
  gen, dis = build_translation_models(config)
  assert gen.num_downs == 8
  x = jnp.zeros((2, 1, 256, 256, 3))
  gv = jax.eval_shape(lambda: gen.init({'params': jax.random.key(0)}, x, train=False,
                                       deterministic=True))
  dv = jax.eval_shape(lambda: dis.init({'params': jax.random.key(0)}, x, x, train=False))
  assert count_params(gv['params']) == OFFICIAL_G_PARAMS
  assert count_params(dv['params']) == OFFICIAL_D_PARAMS
  p = gv['params']
  unused = sum(count_params(p[b][n]) for b, n in (('conv1', 'insnorm_conv'),
                                                   ('conv8', 'insnorm_conv'),
                                                   ('deconv8', 'insnorm_deconv')))
  assert unused == UNUSED_G_NORM_PARAMS
  unused_d = sum(count_params(dv['params'][b]['insnorm']) for b in ('conv1', 'conv5'))
  assert unused_d == UNUSED_D_NORM_PARAMS


def test_config_errors():
  config = config_lib.translation_config()
  config.data.crop_size = 96
  with pytest.raises(ValueError, match='config.data.crop_size=96'):
    build_translation_models(config)
  config.model.num_downs = 5  # 96 = 3 * 2^5: an explicit depth makes it valid
  assert build_translation_models(config)[0].num_downs == 5
  config.model.num_downs = 6
  with pytest.raises(ValueError, match='config.data.crop_size=96'):
    build_translation_models(config)
  config = config_lib.translation_config()
  config.model.fusion = 'average'  # an 'output' point: not in the U-Net
  with pytest.raises(ValueError, match='config.model.fusion'):
    build_translation_models(config)
  with pytest.raises(ValueError, match='divisible'):
    Generator(ngf=4, num_downs=5).init(jax.random.key(0), images(2, 1, 48), train=False,
                                       deterministic=True)


def test_init_distributions():
  gen = Generator(ngf=16, num_downs=5)
  v = init_g(gen, images(2, 1, 32))
  p = v['params']
  kernels = np.concatenate([np.ravel(p[f'{n}{k}'][n]['kernel']) for n in ('conv', 'deconv')
                            for k in range(2, 5)])
  assert abs(kernels.std() - 0.02) < 1e-3 and abs(kernels.mean()) < 1e-3
  # torch default biases: conv fan_in = C_in * 16; ConvTranspose2d fan_in = C_out * 16.
  conv_b, deconv_b = p['conv3']['conv']['bias'], p['deconv2']['deconv']['bias']
  cin, cout = p['conv3']['conv']['kernel'].shape[2], p['deconv2']['deconv']['kernel'].shape[3]
  assert np.abs(conv_b).max() <= 1 / np.sqrt(cin * 16)
  assert np.abs(conv_b).max() > 0.8 / np.sqrt(cin * 16)
  assert np.abs(deconv_b).max() <= 1 / np.sqrt(cout * 16)
  assert np.abs(deconv_b).max() > 0.5 / np.sqrt(cout * 16)
  np.testing.assert_array_equal(p['conv2']['insnorm_conv']['scale'], np.ones((2, 32)))
  np.testing.assert_array_equal(p['conv2']['insnorm_conv']['bias'], np.zeros((2, 32)))
  np.testing.assert_array_equal(v['batch_stats']['conv2']['insnorm_conv']['var'], np.ones((2, 32)))
  np.testing.assert_array_equal(p['alpha'], np.ones(2))


# ----------------------------------------------------------------------------- layers

def transposed_conv_numpy(x, kernel, bias, stride, padding):
  """Direct scatter: out[i*s - p + a, j*s - p + b] += x[i, j] @ kernel[a, b]."""
  n, h, w, _ = x.shape
  k = kernel.shape[0]
  full = np.zeros((n, (h - 1) * stride + k, (w - 1) * stride + k, kernel.shape[-1]))
  for i in range(h):
    for j in range(w):
      full[:, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum(
          'nc,abco->nabo', x[:, i, j].astype(np.float64), kernel)
  out_h, out_w = (h - 1) * stride - 2 * padding + k, (w - 1) * stride - 2 * padding + k
  return full[:, padding:padding + out_h, padding:padding + out_w] + bias


@pytest.mark.parametrize('k,s,p', [(4, 2, 1), (3, 1, 1), (3, 2, 0)])
def test_conv_transpose_matches_scatter(k, s, p):
  rng = np.random.RandomState(1)
  x = rng.randn(2, 3, 5, 7, 4).astype(np.float32)
  layer = layers.SharedConvTranspose(6, k, s, p)
  v = layer.init(jax.random.key(0), jnp.asarray(x))
  kernel, bias = np.asarray(v['params']['kernel']), np.asarray(v['params']['bias'])
  y = np.asarray(layer.apply(v, jnp.asarray(x)))
  for m in range(2):
    np.testing.assert_allclose(y[m], transposed_conv_numpy(x[m], kernel, bias, s, p),
                               rtol=1e-5, atol=1e-5)


def test_instancenorm_update_stats_false_and_axis_name():
  rng = np.random.RandomState(3)
  x = (rng.randn(8, 4, 4, 3) * rng.uniform(0.5, 2, (8, 1, 1, 3)) + rng.randn(8, 1, 1, 3))
  x = jnp.asarray(x.astype(np.float32))
  make = functools.partial(layers.InstanceNorm, use_running_average=False)
  v = make().init(jax.random.key(0), x)
  y_frozen, s_frozen = make(update_stats=False).apply(v, x, mutable=['batch_stats'])
  y_single, s_single = make().apply(v, x, mutable=['batch_stats'])
  np.testing.assert_array_equal(y_frozen, y_single)  # instance statistics either way
  np.testing.assert_array_equal(s_frozen['batch_stats']['mean'], v['batch_stats']['mean'])
  assert np.abs(np.asarray(s_single['batch_stats']['mean'])).max() > 1e-2
  ndev = 4
  fn = jax.pmap(lambda v, x: make(axis_name='b').apply(v, x, mutable=['batch_stats']),
                axis_name='b', in_axes=(None, 0))
  y_multi, s_multi = fn(v, x.reshape(ndev, 2, 4, 4, 3))
  np.testing.assert_allclose(np.asarray(y_multi).reshape(x.shape), y_single, atol=1e-6)
  for key in ('mean', 'var'):
    for d in range(ndev):
      np.testing.assert_allclose(np.asarray(s_multi['batch_stats'][key][d]),
                                 s_single['batch_stats'][key], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- behaviour

def test_exchange_inside_the_block():
  """conv2's output: a channel whose |scale| < THR takes the other branch's post-IN value."""
  from cen_jax.models.pix2pix import ConvBlock
  shapes = g_shapes(2, 4, 5, 32)
  v = random_variables(shapes, seed=1, low_scales=False)
  scale = np.array(v['params']['conv2']['insnorm_conv']['scale'])
  scale[0, 1], scale[1, 5], scale[1, 6] = 0.005, -0.009, 0.0
  v['params']['conv2']['insnorm_conv']['scale'] = scale
  block_vars = {c: v[c]['conv2'] for c in ('params', 'batch_stats')}
  x = images(2, 2, 16, channels=4)
  norm = dict(use_running_average=False, update_stats=False, momentum=0.1, epsilon=1e-5,
              axis_name=None)
  make = lambda f: ConvBlock(8, True, True, norm, f, THR)
  cen = np.asarray(make('cen').apply(block_vars, x))
  none = np.asarray(make('none').apply(block_vars, x))
  expected = none.copy()
  expected[0, ..., 1] = none[1, ..., 1]
  expected[1, ..., 5:7] = none[0, ..., 5:7]
  np.testing.assert_array_equal(cen, expected)
  assert np.abs(none[0, ..., 1] - none[1, ..., 1]).max() > 1e-2


@pytest.mark.parametrize('m,fusion_name,low,mixes', [
    (2, 'cen', True, True), (2, 'cen', False, False), (2, 'none', True, False),
    (3, 'cen', True, True)])
def test_exchange_couples_branches_only_when_due(m, fusion_name, low, mixes):
  """Branch 0's output depends on branch 1's input iff some scale is below the threshold
  and fusion is 'cen' (convs are shared, norms per instance: nothing else mixes)."""
  gen = Generator(ngf=4, num_downs=5, fusion=fusion_name, threshold=THR)
  v = random_variables(g_shapes(m, 4, 5, 32), seed=2, low_scales=low)
  x = images(m, 2, 32, seed=3)
  y = x.at[1].set(images(1, 2, 32, seed=4)[0])
  a, _ = run_g(gen, v, x)
  b, _ = run_g(gen, v, y)
  diff = np.abs(np.asarray(a['branches'][0]) - np.asarray(b['branches'][0])).max()
  assert (diff > 1e-3) if mixes else (diff == 0.0)


def test_single_branch_never_exchanges():
  v = random_variables(g_shapes(1, 4, 5, 32), seed=5)  # low scales present
  x = images(1, 2, 32, seed=6)
  cen, _ = run_g(Generator(ngf=4, num_downs=5, fusion='cen', threshold=THR), v, x)
  none, _ = run_g(Generator(ngf=4, num_downs=5, fusion='none', threshold=THR), v, x)
  np.testing.assert_array_equal(cen['branches'], none['branches'])
  np.testing.assert_allclose(cen['ensemble'], cen['branches'][0], rtol=1e-6)


def test_dropout():
  gen = Generator(ngf=4, num_downs=5, fusion='none')
  v = random_variables(g_shapes(2, 4, 5, 32), seed=7, low_scales=False)
  # Identical private parameters and inputs for both branches: without dropout, identical
  # outputs; with dropout, independent masks make them differ.
  v['params'] = jax.tree_util.tree_map(
      lambda a: np.broadcast_to(a[:1], a.shape).copy() if a.ndim == 2 else a, v['params'])
  x = images(1, 2, 32, seed=8)
  x = jnp.concatenate([x, x])
  det_a, _ = run_g(gen, v, x, deterministic=True, seed=0)
  det_b, _ = run_g(gen, v, x, deterministic=True, seed=1)
  np.testing.assert_array_equal(det_a['branches'], det_b['branches'])
  np.testing.assert_array_equal(det_a['branches'][0], det_a['branches'][1])
  drop_a, _ = run_g(gen, v, x, deterministic=False, seed=0)
  drop_a2, _ = run_g(gen, v, x, deterministic=False, seed=0)
  drop_b, _ = run_g(gen, v, x, deterministic=False, seed=1)
  np.testing.assert_array_equal(drop_a['branches'], drop_a2['branches'])  # same rng, same mask
  assert np.abs(np.asarray(drop_a['branches']) - np.asarray(drop_b['branches'])).max() > 1e-3
  assert np.abs(np.asarray(drop_a['branches'][0] - drop_a['branches'][1])).max() > 1e-3
  assert np.abs(np.asarray(drop_a['branches']) - np.asarray(det_a['branches'])).max() > 1e-3
  no_drop = Generator(ngf=4, num_downs=5, fusion='none', dropout=0.0)
  np.testing.assert_array_equal(run_g(no_drop, v, x, deterministic=False)[0]['branches'],
                                det_a['branches'])


def _numpy_in_stats(a, mean, var, momentum=0.1):
  """One torch InstanceNorm2d running update from pre-norm activations a [N, H, W, C]."""
  a = a.astype(np.float64)
  k = a.shape[1] * a.shape[2]
  mu = a.mean(axis=(1, 2))
  unbiased = a.var(axis=(1, 2)) * k / (k - 1)
  return ((1 - momentum) * mean + momentum * mu.mean(0),
          (1 - momentum) * var + momentum * unbiased.mean(0))


def test_generator_running_stats_by_hand():
  gen = Generator(ngf=4, num_downs=5)
  v = random_variables(g_shapes(2, 4, 5, 32), seed=9)
  x = images(2, 3, 32, seed=10)
  _, inter = jax.jit(lambda v, x: gen.apply(
      v, x, train=True, deterministic=True, mutable=['batch_stats', 'intermediates'],
      capture_intermediates=True))(v, x)
  stats = inter['batch_stats']
  for block, conv, norm in (('conv3', 'conv', 'insnorm_conv'),
                            ('deconv2', 'deconv', 'insnorm_deconv')):
    pre = np.asarray(inter['intermediates'][block][conv]['__call__'][0])
    old = v['batch_stats'][block][norm]
    for m in range(2):
      mean, var = _numpy_in_stats(pre[m], old['mean'][m], old['var'][m])
      np.testing.assert_allclose(stats[block][norm]['mean'][m], mean, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(stats[block][norm]['var'][m], var, rtol=1e-5, atol=1e-6)
  # Never-applied norms keep their statistics; train=False leaves every statistic.
  for block, norm in (('conv1', 'insnorm_conv'), ('conv5', 'insnorm_conv'),
                      ('deconv5', 'insnorm_deconv')):
    np.testing.assert_array_equal(stats[block][norm]['mean'], v['batch_stats'][block][norm]['mean'])
  _, frozen = run_g(gen, v, x, train=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen['batch_stats'], v['batch_stats'])


def test_discriminator_sequential_running_stats_by_hand():
  dis = Discriminator(ndf=4)
  x, y = images(3, 2, 32, seed=11), images(3, 2, 32, seed=12)
  shapes = jax.eval_shape(lambda: dis.init(jax.random.key(0), x, y, train=False))
  v = random_variables(shapes, seed=13)
  _, inter = jax.jit(lambda v, x, y: dis.apply(
      v, x, y, train=True, mutable=['batch_stats', 'intermediates'],
      capture_intermediates=True))(v, x, y)
  pre = np.asarray(inter['intermediates']['conv3']['conv']['__call__'][0])
  mean, var = v['batch_stats']['conv3']['insnorm']['mean'], v['batch_stats']['conv3']['insnorm']['var']
  for m in range(3):  # the shared norm sees branch 0, then 1, then 2
    mean, var = _numpy_in_stats(pre[m], mean, var)
  got = inter['batch_stats']['conv3']['insnorm']
  np.testing.assert_allclose(got['mean'], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['var'], var, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(inter['batch_stats']['conv1']['insnorm']['mean'],
                                v['batch_stats']['conv1']['insnorm']['mean'])


def test_data_parallel_equals_one_device():
  gen = Generator(ngf=4, num_downs=5, axis_name='b')
  single = Generator(ngf=4, num_downs=5)
  v = random_variables(g_shapes(2, 4, 5, 32), seed=14)
  x = images(2, 4, 32, seed=15)
  out_1, stats_1 = run_g(single, v, x, train=True)
  fn = jax.pmap(lambda v, x: run_g(gen, v, x, train=True), axis_name='b', in_axes=(None, 1),
                out_axes=(1, 0))
  out_n, stats_n = fn(v, x.reshape(2, 2, 2, 32, 32, 3))
  np.testing.assert_allclose(np.asarray(out_n['branches']).reshape(2, 4, 32, 32, 3),
                             out_1['branches'], atol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a[1], b, rtol=1e-5, atol=1e-6),
                         stats_n['batch_stats'], stats_1['batch_stats'])


def test_slim_penalty_is_official():
  v = random_variables(g_shapes(2, 4, 5, 32), seed=16)
  scales = translation_exchange_scales(v['params'])
  assert len(scales) == 5
  # The official slim list: every 'insnorm_conv' weight in named_parameters order
  # (conv1.insnorm_0, conv1.insnorm_1, conv2.insnorm_0, ...), even -> first half, odd ->
  # second half.
  official = []
  for k in range(1, 6):
    for b in range(2):
      official.append(v['params'][f'conv{k}']['insnorm_conv']['scale'][b])
  slim = [p[:len(p) // 2] if i % 2 == 0 else p[len(p) // 2:] for i, p in enumerate(official)]
  expected = sum(np.abs(s.astype(np.float64)).sum() for s in slim)
  np.testing.assert_allclose(float(ops.l1_penalty(scales)), expected, rtol=1e-6)
  for k, s in enumerate(scales, start=1):
    np.testing.assert_array_equal(s, v['params'][f'conv{k}']['insnorm_conv']['scale'])


# ----------------------------------------------------------------------------- torch parity

def _torch():
  torch = pytest.importorskip('torch')
  torch.set_num_threads(min(2, os.cpu_count() or 1))
  return torch


def _reference():
  _torch()
  from tests.helpers import torch_reference_pix2pix
  return torch_reference_pix2pix


def _randomize_torch(module, seed, threshold=THR):
  """Official-like random weights plus random norm parameters and statistics, with about a
  quarter of the norm scales below the threshold (so channels really exchange)."""
  torch = _torch()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, t in module.state_dict().items():
      if name.endswith('num_batches_tracked'):
        continue
      parent, leaf = (['', ''] + name.split('.'))[-2:]
      if leaf == 'weight' and parent == 'module' and t.ndim == 4:
        t.normal_(0, 0.02, generator=gen)
      elif leaf == 'weight':  # norm scale
        t.uniform_(0.5, 1.5, generator=gen)
        low = torch.rand(t.shape, generator=gen) < 0.25
        t[low] = threshold / 10
      elif leaf == 'running_var':
        t.uniform_(0.5, 2.0, generator=gen)
      else:
        t.normal_(0, 0.3, generator=gen)


def _state_dict_numpy(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _max_rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / np.abs(b).max()


PARITY_ERRORS = {}


@pytest.mark.parametrize('m,ngf,size', [(2, 8, 64), (3, 4, 32), (2, 8, 256), (2, 64, 256)])
def test_generator_parity(m, ngf, size):
  torch = _torch()
  ref = _reference()
  num_downs = int(np.log2(size))
  tg = ref.Generator(m, num_filter=ngf, num_downs=num_downs, threshold=THR, drop_rate=0.0)
  _randomize_torch(tg, seed=m * 100 + ngf)
  sd = _state_dict_numpy(tg)
  gen = Generator(ngf=ngf, num_downs=num_downs, threshold=THR)
  variables = torch_io.import_generator(sd, g_shapes(m, ngf, num_downs, size))
  x = images(m, 2, size, seed=17)
  tg.train()  # the official G always runs in train mode (instance statistics)
  # The outputs are compared with the official G run in float64. In float32, its output
  # for one sample of one branch moved by 5e-5 depending on the state of the heap (when other
  # tests ran before it in the same process), while cen-jax's stayed bit-identical; both
  # float32 outputs are about 1e-6 from the float64 one.
  with torch.no_grad():
    touts64, _ = copy.deepcopy(tg).double()(
        [torch.from_numpy(np.array(x[i], np.float64).transpose(0, 3, 1, 2)) for i in range(m)])
    _, talpha = tg([torch.from_numpy(np.array(x[i]).transpose(0, 3, 1, 2)) for i in range(m)])
  touts64 = [t.numpy().transpose(0, 2, 3, 1) for t in touts64]
  out, new = run_g(gen, variables, x, train=True, deterministic=True)
  errors = [_max_rel(out['branches'][i], touts64[i]) for i in range(m)]
  errors.append(_max_rel(out['ensemble'], touts64[m]))
  PARITY_ERRORS[('G', m, ngf, size)] = errors
  print(f'G parity M={m} ngf={ngf} {size}x{size}: max|err|/max|out| per branch + ensemble',
        errors)
  assert max(errors) < 1e-5
  np.testing.assert_allclose(out['alpha'], talpha.detach().numpy(), rtol=1e-6)
  # Running statistics after one train-mode forward, every norm (unused ones untouched).
  exported = torch_io.export_generator({'params': variables['params'],
                                        'batch_stats': new['batch_stats']})
  after = _state_dict_numpy(tg)
  stat_err = 0.0
  for key, value in after.items():
    if 'running_' in key:
      stat_err = max(stat_err, np.abs(exported[key] - value).max() / max(1.0, np.abs(value).max()))
  PARITY_ERRORS[('G stats', m, ngf, size)] = stat_err
  print(f'G running stats M={m} ngf={ngf} {size}: max rel err', stat_err)
  assert stat_err < 1e-5


@pytest.mark.parametrize('m,ndf,size', [(2, 8, 64), (3, 4, 32), (2, 64, 256)])
def test_discriminator_parity(m, ndf, size):
  torch = _torch()
  ref = _reference()
  td = ref.Discriminator(num_filter=ndf)
  _randomize_torch(td, seed=7 + m)
  sd = _state_dict_numpy(td)
  dis = Discriminator(ndf=ndf)
  x, y = images(m, 2, size, seed=18), images(m, 2, size, seed=19)
  shapes = jax.eval_shape(lambda: dis.init(jax.random.key(0), x, y, train=False))
  variables = torch_io.import_discriminator(sd, shapes)
  to_t = lambda a: torch.from_numpy(np.array(a).transpose(0, 3, 1, 2))
  td.train()
  with torch.no_grad():
    touts = td([to_t(x[i]) for i in range(m)], [to_t(y[i]) for i in range(m)])
  logits, new = jax.jit(functools.partial(dis.apply, train=True, mutable=['batch_stats']))(
      variables, x, y)
  probs = jax.nn.sigmoid(logits)
  errors = [_max_rel(probs[i], touts[i].numpy().transpose(0, 2, 3, 1)) for i in range(m)]
  PARITY_ERRORS[('D', m, ndf, size)] = errors
  print(f'D parity M={m} ndf={ndf} {size}: max|err|/max|out| per branch', errors)
  assert max(errors) < 1e-5
  exported = torch_io.export_discriminator({'params': variables['params'],
                                            'batch_stats': new['batch_stats']})
  after = _state_dict_numpy(td)
  stat_err = max(np.abs(exported[k] - v).max() / max(1.0, np.abs(v).max())
                 for k, v in after.items() if 'running_' in k)
  print(f'D running stats M={m} (sequential updates): max rel err', stat_err)
  assert stat_err < 1e-5


def test_official_keys_and_strict_round_trip(tmp_path):
  """Official G (M=2, ngf 64, 256) and D: the exported keys, order and shapes are the
  reference's state_dict; import -> export is bit-exact; a saved file loads strictly."""
  torch = _torch()
  ref = _reference()
  tg, td = ref.Generator(2), ref.Discriminator()
  assert sum(p.numel() for p in tg.parameters()) == OFFICIAL_G_PARAMS
  assert sum(p.numel() for p in td.parameters()) == OFFICIAL_D_PARAMS
  _randomize_torch(tg, seed=1)
  _randomize_torch(td, seed=2)
  gen, dis = build_translation_models(config_lib.translation_config())
  x = jnp.zeros((2, 1, 256, 256, 3))
  g_template = jax.eval_shape(lambda: gen.init(jax.random.key(0), x, train=False,
                                               deterministic=True))
  d_template = jax.eval_shape(lambda: dis.init(jax.random.key(0), x, x, train=False))
  for module, template, imp, exp, save in (
      (tg, g_template, torch_io.import_generator, torch_io.export_generator,
       torch_io.save_generator),
      (td, d_template, torch_io.import_discriminator, torch_io.export_discriminator,
       torch_io.save_discriminator)):
    sd = _state_dict_numpy(module)
    variables = imp(sd, template)
    back = exp(variables)
    assert list(back) == list(sd)
    for key in sd:
      assert back[key].dtype == sd[key].dtype and back[key].shape == sd[key].shape, key
      np.testing.assert_array_equal(back[key], sd[key])
    path = tmp_path / 'ckpt.pkl'
    save(path, variables)
    fresh = type(module)(2) if module is tg else type(module)()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for key, value in fresh.state_dict().items():
      np.testing.assert_array_equal(value.numpy(), sd[key])
    np.testing.assert_array_equal(torch_io.load_state_dict(path)[next(iter(sd))],
                                  sd[next(iter(sd))])


def test_checkpoint_errors():
  _torch()
  ref = _reference()
  sd_g3 = _state_dict_numpy(ref.Generator(3, num_filter=4, num_downs=5))
  sd_d = _state_dict_numpy(ref.Discriminator(num_filter=4))
  template = g_shapes(2, 4, 5, 32)
  with pytest.raises(torch_io.CheckpointError,
                     match=r"'alpha' has shape \(3,\) but the model expects \(2,\) "
                           r"\(the model has 2 modalities\)"):
    torch_io.import_generator(sd_g3, template)
  with pytest.raises(torch_io.CheckpointError, match='checkpoint is a discriminator'):
    torch_io.import_generator(sd_d, template)
  d_template = jax.eval_shape(lambda: Discriminator(ndf=4).init(
      jax.random.key(0), images(2, 1, 32), images(2, 1, 32), train=False))
  with pytest.raises(torch_io.CheckpointError, match='checkpoint is a generator'):
    torch_io.import_discriminator(sd_g3, d_template)
  sd_d_missing = dict(sd_d)
  del sd_d_missing['conv4.insnorm.module.running_var']
  with pytest.raises(torch_io.CheckpointError,
                     match=r"lacks key 'conv4.insnorm.module.running_var' \(shape \(32,\)\)"):
    torch_io.import_discriminator(sd_d_missing, d_template)
  sd_g8 = _state_dict_numpy(ref.Generator(2, num_filter=8, num_downs=5))
  with pytest.raises(torch_io.CheckpointError,
                     match=r"'conv1.conv.module.weight' has shape \(8, 3, 4, 4\) but the "
                           r"model expects \(4, 3, 4, 4\)"):
    torch_io.import_generator(sd_g8, template)


def test_gradient_parity():
  """Gradients of an official-style loss (L1 of every branch and of the ensemble, plus the D
  scores) match torch's autograd through the in-place activations and the exchange."""
  torch = _torch()
  ref = _reference()
  m, ngf, size, num_downs = 2, 4, 32, 5
  tg = ref.Generator(m, num_filter=ngf, num_downs=num_downs, threshold=THR, drop_rate=0.0)
  td = ref.Discriminator(num_filter=4)
  _randomize_torch(tg, seed=21)
  _randomize_torch(td, seed=22)
  gen, dis = Generator(ngf=ngf, num_downs=num_downs, threshold=THR), Discriminator(ndf=4)
  g_vars = torch_io.import_generator(_state_dict_numpy(tg), g_shapes(m, ngf, num_downs, size))
  x, target = images(m, 2, size, seed=23), images(1, 2, size, seed=24)[0]
  d_vars = torch_io.import_discriminator(_state_dict_numpy(td), jax.eval_shape(
      lambda: dis.init(jax.random.key(0), x, x, train=False)))

  def loss_fn(g_params, d_params):
    out, _ = gen.apply({'params': g_params, 'batch_stats': g_vars['batch_stats']}, x,
                       train=True, deterministic=True, mutable=['batch_stats'])
    l1 = sum(jnp.mean(jnp.abs(out['branches'][i] - target)) for i in range(m))
    l1 = l1 + jnp.mean(jnp.abs(out['ensemble'] - target))
    logits, _ = dis.apply({'params': d_params, 'batch_stats': d_vars['batch_stats']}, x,
                          out['branches'], train=True, mutable=['batch_stats'])
    return l1 + jnp.mean(jax.nn.sigmoid(logits))

  g_grads, d_grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(g_vars['params'],
                                                                 d_vars['params'])
  to_t = lambda a: torch.from_numpy(np.array(a).transpose(0, 3, 1, 2))
  tg.train()
  td.train()
  outs, _ = tg([to_t(x[i]) for i in range(m)])
  t_target = to_t(target)
  loss = sum(torch.mean(torch.abs(o - t_target)) for o in outs)
  scores = td([to_t(x[i]) for i in range(m)], outs[:m])
  loss = loss + torch.mean(torch.stack([s.mean() for s in scores]))
  loss.backward()
  worst = 0.0
  for module, grads, export in ((tg, g_grads, torch_io.export_generator),
                                (td, d_grads, torch_io.export_discriminator)):
    stats = (g_vars if module is tg else d_vars)['batch_stats']
    ours = export({'params': grads, 'batch_stats': stats})
    # Biases of convs followed by an InstanceNorm have zero gradient up to rounding: those are
    # checked to be ~0 against the module's gradient scale, the rest against their own.
    scale = max(p.grad.abs().max().item() for p in module.parameters() if p.grad is not None)
    for name, param in module.named_parameters():
      if param.grad is None:  # never-applied norms: no gradient in torch, zero in JAX
        assert np.abs(ours[name]).max() == 0.0, name
        continue
      expected = param.grad.numpy()
      if np.abs(expected).max() < 1e-4 * scale:  # zero up to rounding in torch: so in JAX
        assert np.abs(ours[name]).max() < 1e-4 * scale, name
        continue
      err = np.abs(ours[name] - expected).max() / np.abs(expected).max()
      worst = max(worst, err)
      assert err < 1e-4, (name, err)
  print('gradient parity: worst max|err|/max|grad| over all parameters', worst)
