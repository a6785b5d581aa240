"""Model-level behaviour (cen_jax/models, cen_jax/layers) against independent truths.

Tiny configurations keep this CPU-fast. Variables are built from `jax.eval_shape(model.init)`
and filled with numpy random values (no compiled init), so per-branch parameters and
statistics differ between branches and any cross-branch mixing is visible.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import config as config_lib
from cen_jax import layers
from cen_jax.models import build_model, count_params, exchange_scales, path_str
from cen_jax.models.resnet import ResNetEncoder

EPS = 1e-5
THR = 2e-2


# ----------------------------------------------------------------------------- helpers


def tiny_config(fusion='cen', modalities=('rgb', 'depth'), blocks=(1, 1, 2, 1),
                widths=(8, 8, 8, 8), **overrides):
  config = config_lib.base_config()
  config.modalities = tuple(modalities)
  m = config.model
  m.fusion = fusion
  m.blocks = tuple(blocks)
  m.stem_width = 8
  m.widths = tuple(widths)
  m.decoder_widths = (8, 8)
  m.num_classes = 3
  m.dropout = 0.0
  m.threshold = THR
  for k, v in overrides.items():
    m[k] = v
  return config


# One odd image size for most tests, so eager-mode op compilations are shared between them.
H, W = 29, 35


def rand_images(num, n=1, h=H, w=W, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(num, n, h, w, 3).astype(np.float32))


def fill_variables(shapes, seed=0):
  """Random variables with the structure of `shapes` (an eval_shape of init), as numpy."""
  rng = np.random.RandomState(seed)

  def make(path, s):
    name = path_str(path).split('/')[-1]
    shape = s.shape
    if name == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      return (rng.randn(*shape) * np.sqrt(1.0 / fan_in)).astype(np.float32)
    if name == 'scale':
      return (rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape)).astype(np.float32)
    if name == 'bias':
      return (0.1 * rng.randn(*shape)).astype(np.float32)
    if name == 'mean':
      return (0.1 * rng.randn(*shape)).astype(np.float32)
    if name == 'var':
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name == 'alpha':
      return rng.randn(*shape).astype(np.float32)
    raise AssertionError(f'unexpected leaf {path_str(path)}')

  return jax.tree_util.tree_map_with_path(make, shapes)


def variable_shapes(model, x):
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def make_variables(model, x, seed=0):
  return fill_variables(variable_shapes(model, x), seed)


def assert_close(actual, desired, tol=1e-5):
  """Relative to the largest magnitude: summation order may differ between XLA programs."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(np.asarray(actual), desired, rtol=tol,
                             atol=tol * max(float(np.abs(desired).max()), 1e-6))


def assert_trees_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def conv_out(size, k, s, p):
  return (size + 2 * p - k) // s + 1


def expected_stage_sizes(h, w):
  """PyTorch stride arithmetic: stem conv 7/2/3, maxpool 3/2/1, then 3x3/2/1 per stage."""
  sizes = []
  for size in (h, w):
    s1 = conv_out(conv_out(size, 7, 2, 3), 3, 2, 1)
    s2 = conv_out(s1, 3, 2, 1)
    s3 = conv_out(s2, 3, 2, 1)
    s4 = conv_out(s3, 3, 2, 1)
    sizes.append((s1, s2, s3, s4))
  return list(zip(*sizes))


# ----------------------------------------------------------------------------- CEN exchange


def record_layer(block_name, names=('conv2', 'conv3')):
  """Interceptor recording (input, output) of SharedConvs `names` inside `block_name`."""
  rec = {}

  def interceptor(next_fun, args, kwargs, ctx):
    out = next_fun(*args, **kwargs)
    mod = ctx.module
    parent = getattr(mod.parent, 'name', None)
    if ctx.method_name == '__call__' and parent == block_name and mod.name in names:
      rec[mod.name] = (args[0], out)
    return out

  return rec, interceptor


@pytest.mark.parametrize('train', [False, True])
def test_cen_exchange_reads_private_bn2_scales(train):
  """Edited bn2 scales of one block make exactly those channels take the other branch's
  post-bn2 value (computed here by hand from conv2's output and the norm's variables)."""
  config = tiny_config('cen', frozen_bn=not train)
  model = build_model(config)
  x = rand_images(2)
  variables = make_variables(model, x, seed=1)
  block = 'layer2_0'
  bn2 = variables['params']['encoder'][block]['bn2']
  c = bn2['scale'].shape[1]
  assert c == 8
  bn2['scale'][0, [1, 3]] = [0.001, -0.0199]   # branch 0 takes branch 1's ch 1, 3
  bn2['scale'][1, 6] = 0.0                      # branch 1 takes branch 0's ch 6
  bn2['scale'][1, 2] = -THR                     # |s| == threshold: kept
  rec, interceptor = record_layer(block)
  with nn.intercept_methods(interceptor):
    out = model.apply(variables, x, train=train, mutable=['batch_stats'] if train else False)
  z = np.asarray(rec['conv2'][1], np.float64)   # [M, N, h, w, C] conv2 output
  got = np.asarray(rec['conv3'][0])             # conv3 input = relu(exchange(bn2(z)))
  if train:
    mean = z.mean(axis=(1, 2, 3))
    var = z.var(axis=(1, 2, 3))
  else:
    stats = variables['batch_stats']['encoder'][block]['bn2']
    mean, var = stats['mean'].astype(np.float64), stats['var'].astype(np.float64)
  y = ((z - mean[:, None, None, None]) / np.sqrt(var[:, None, None, None] + EPS)
       * bn2['scale'][:, None, None, None] + bn2['bias'][:, None, None, None])
  expected = y.copy()
  expected[0, ..., [1, 3]] = y[1, ..., [1, 3]]
  expected[1, ..., 6] = y[0, ..., 6]
  assert_close(got, np.maximum(expected, 0), tol=1e-5)
  # Non-vacuous: the two branches' post-norm values differ in the exchanged channels.
  for ch in (1, 3, 6):
    assert np.abs(np.maximum(y[0, ..., ch], 0) - np.maximum(y[1, ..., ch], 0)).max() > 1e-2
  assert np.isfinite(np.asarray(out[0]['branches'] if train else out['branches'])).all()


def test_cen_exchange_creates_cross_branch_dependence():
  """All branch-1 bn2 scales below threshold (branch 0 above): branch 1's output depends on
  branch 0's input; with every scale above threshold it does not (independent branches)."""
  config = tiny_config('cen')
  model = build_model(config)
  x = rand_images(2, seed=2)
  x_pert = x.at[0].add(jnp.asarray(np.random.RandomState(9).randn(*x.shape[1:]), jnp.float32))
  variables = make_variables(model, x, seed=3)   # |scale| in [0.5, 1.5]: nothing exchanges
  apply = lambda v, x: np.asarray(model.apply(v, x, train=False)['branches'])
  base, pert = apply(variables, x), apply(variables, x_pert)
  np.testing.assert_array_equal(pert[1], base[1])
  assert np.abs(pert[0] - base[0]).max() > 1e-3
  for path, s in jax.tree_util.tree_flatten_with_path(variables['params'])[0]:
    if path_str(path).endswith('bn2/scale'):
      s[1] = 1e-3 * np.sign(s[1])
  base, pert = apply(variables, x), apply(variables, x_pert)
  assert np.abs(pert[1] - base[1]).max() > 1e-3


def test_exchange_scales_finds_every_bn2():
  config = tiny_config('cen', blocks=(1, 2, 3, 2))
  model = build_model(config)
  shapes = variable_shapes(model, rand_images(2, h=32, w=32))
  scales = exchange_scales(shapes['params'])
  assert [s.shape for s in scales] == [(2, 8)] * 8
  config = tiny_config('cen', widths=(4, 8, 16, 8))
  shapes = variable_shapes(build_model(config), rand_images(3, h=32, w=32))
  scales = exchange_scales(shapes['params'])
  assert [s.shape for s in scales] == [(3, 4), (3, 8), (3, 16), (3, 16), (3, 8)]


def test_apply_is_pure_and_jit_matches_eager():
  config = tiny_config('cen', frozen_bn=False)
  model = build_model(config)
  x = rand_images(2, seed=4)
  variables = make_variables(model, x, seed=5)
  # Some channels exchange, so the exchange path is exercised.
  variables['params']['encoder']['layer1_0']['bn2']['scale'][0, :2] = 0.0
  variables['params']['encoder']['layer3_1']['bn2']['scale'][1, 3:6] = 0.001
  snapshot = jax.tree.map(np.copy, variables)
  both = lambda v, x: (model.apply(v, x, train=False),
                       model.apply(v, x, train=True, mutable=['batch_stats']))
  first = both(variables, x)
  second = both(variables, x)
  assert_trees_equal(first, second)
  jitted = jax.jit(both)(variables, x)
  assert jax.tree.structure(jitted) == jax.tree.structure(first)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(jitted)):
    assert_close(b, a)
  assert_trees_equal(variables, snapshot)  # nothing was mutated in place


@pytest.mark.parametrize('policy', ['blocks', 'keep_convs'])
def test_remat_keeps_variables_outputs_and_gradients(policy):
  """config.model.remat recomputes blocks in the backward pass: the same variable paths (so
  checkpoints are the same), the same outputs and updated statistics, and the same gradients
  as without remat, with channels exchanged."""
  config = tiny_config('cen', frozen_bn=False)
  plain = build_model(config)
  config.model.remat = policy
  rematted = build_model(config)
  x = rand_images(2, seed=4)
  variables = make_variables(plain, x, seed=5)
  variables['params']['encoder']['layer1_0']['bn2']['scale'][0, :2] = 0.0
  assert jax.tree.structure(variable_shapes(rematted, x)) == jax.tree.structure(variables)

  def loss_and_grads(model):
    def loss(params):
      out, stats = model.apply({**variables, 'params': params}, x, train=True,
                               mutable=['batch_stats'])
      return jnp.sum(out['ensemble'] ** 2) + jnp.sum(out['branches'] ** 2), (out, stats)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])

  expected, got = loss_and_grads(plain), loss_and_grads(rematted)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    assert_close(b, a)


def test_unknown_remat_policy_is_one_line():
  config = tiny_config('cen', remat='everything')
  with pytest.raises(ValueError, match=r"config.model.remat='everything': expected one of "
                                       r'none, blocks, keep_convs'):
    variable_shapes(build_model(config), rand_images(2))


# ----------------------------------------------------------------------------- M = 1


def tile_branch_variables(single, target_shapes):
  """M = 1 variables -> M-branch variables with identical per-branch values."""
  def tile(a, s):
    a = np.asarray(a)
    if a.shape == s.shape:
      return a
    assert a.shape[0] == 1 and a.shape[1:] == s.shape[1:]
    return np.repeat(a, s.shape[0], axis=0)
  return jax.tree.map(tile, single, target_shapes)


def test_single_modality_is_plain_network():
  config1 = tiny_config('cen', modalities=('rgb',))
  model1 = build_model(config1)
  x1 = rand_images(1, seed=6)
  v1 = make_variables(model1, x1, seed=7)
  # Channels "below threshold" must not change anything with a single branch.
  for path, s in jax.tree_util.tree_flatten_with_path(v1['params'])[0]:
    if path_str(path).endswith('bn2/scale'):
      s[0, ::2] = 0.0
  out1 = model1.apply(v1, x1, train=False)
  assert out1['branches'].shape[0] == 1
  np.testing.assert_array_equal(np.asarray(out1['alpha']), [1.0])
  np.testing.assert_allclose(np.asarray(out1['ensemble']), np.asarray(out1['branches'][0]),
                             rtol=1e-6, atol=1e-7)
  # Same as fusion 'none' with the same parameters.
  out_none = build_model(tiny_config('none', modalities=('rgb',))).apply(v1, x1, train=False)
  assert_close(out_none['branches'], out1['branches'])
  # M = 2 with identical parameters on both branches and identical inputs: each branch equals
  # the single-modal network (for 'none', and for 'cen' whose swap then exchanges equal values).
  x2 = jnp.concatenate([x1, x1])
  for fusion in ('none', 'cen'):
    model2 = build_model(tiny_config(fusion))
    v2 = tile_branch_variables(v1, variable_shapes(model2, x2))
    out2 = model2.apply(v2, x2, train=False)
    for m in range(2):
      assert_close(out2['branches'][m], out1['branches'][0])


# ----------------------------------------------------------------------------- permutation


def per_branch_mask(shapes_a, shapes_b):
  """True for leaves whose leading (branch) axis differs between two branch counts."""
  return jax.tree.map(lambda a, b: a.shape != b.shape, shapes_a, shapes_b)


@pytest.mark.parametrize('train', [False, True])
def test_cen_branch_permutation_equivariance(train):
  config = tiny_config('cen', frozen_bn=not train)
  model = build_model(config)
  x = rand_images(3, seed=8)
  shapes3 = variable_shapes(model, x)
  is_branch = per_branch_mask(shapes3, variable_shapes(model, x[:2]))
  variables = fill_variables(shapes3, seed=9)
  rng = np.random.RandomState(10)
  for s in exchange_scales(variables['params']):
    s[rng.rand(*s.shape) < 0.3] = 0.001   # ~30% of channels exchange
  perm = np.array([2, 0, 1])
  permuted = jax.tree.map(lambda a, b: a[perm] if b else a, variables, is_branch)
  kw = dict(train=train, mutable=['batch_stats']) if train else dict(train=train)
  out = model.apply(variables, x, **kw)
  out_p = model.apply(permuted, x[perm], **kw)
  if train:
    (out, stats), (out_p, stats_p) = out, out_p
    stats_perm = jax.tree.map(lambda a, b: np.asarray(a)[perm] if b else a,
                              stats['batch_stats'], is_branch['batch_stats'])
    for a, b in zip(jax.tree.leaves(stats_perm), jax.tree.leaves(stats_p['batch_stats'])):
      assert_close(b, a)
  assert_close(out_p['branches'], np.asarray(out['branches'])[perm])
  np.testing.assert_allclose(np.asarray(out_p['alpha']), np.asarray(out['alpha'])[perm],
                             rtol=1e-6)
  assert_close(out_p['ensemble'], out['ensemble'])
  # Non-vacuous: the branches differ from one another.
  b = np.asarray(out['branches'])
  assert np.abs(b[0] - b[1]).max() > 1e-3 and np.abs(b[1] - b[2]).max() > 1e-3


# ----------------------------------------------------------------------------- shapes


def test_output_shapes_odd_size_eval_shape():
  h, w = 425, 560
  model = build_model(tiny_config('cen', widths=(4, 8, 8, 8)))
  x = jax.ShapeDtypeStruct((2, 1, h, w, 3), jnp.float32)
  shapes = variable_shapes(model, x)
  out, inter = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                               mutable=['intermediates']), shapes, x)
  stages = expected_stage_sizes(h, w)
  # By hand: 425 -> (425+6-7)//2+1 = 213 -> (213+2-3)//2+1 = 107; 560 -> 280 -> 140.
  assert stages == [(107, 140), (54, 70), (27, 35), (14, 18)]
  assert out['branches'].shape == (2, 1, 107, 140, 3)
  assert out['ensemble'].shape == (1, 107, 140, 3)
  enc = inter['intermediates']['encoder']['__call__'][0]
  for feat, (sh, sw), planes in zip(enc, stages, (4, 8, 8, 8)):
    assert feat.shape == (2, 1, sh, sw, 4 * planes)


@pytest.mark.parametrize('h, w', [(17, 23), (H, W)])
def test_output_shapes_odd_size_real(h, w):
  model = build_model(tiny_config('cen'))
  x = rand_images(2, h=h, w=w, seed=h)
  variables = make_variables(model, x, seed=h)
  out = model.apply(variables, x, train=False)
  sh, sw = expected_stage_sizes(h, w)[0]
  assert out['branches'].shape == (2, 1, sh, sw, 3)
  assert out['ensemble'].shape == (1, sh, sw, 3)
  assert out['branches'].dtype == jnp.float32
  assert np.isfinite(np.asarray(out['branches'])).all()


@pytest.mark.parametrize('resnet, expected_params', [
    (50, 99_157_226), (101, 118_201_578), (152, 133_891_306)])
def test_full_size_shapes_and_parameter_count(resnet, expected_params):
  config = config_lib.base_config()
  config.model.resnet = resnet
  model = build_model(config)
  x = jax.ShapeDtypeStruct((2, 1, 500, 500, 3), jnp.float32)
  shapes = variable_shapes(model, x)
  assert count_params(shapes['params']) == expected_params
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))
  num_blocks = sum(config_lib.RESNET_BLOCKS[resnet])
  assert len(exchange_scales(shapes['params'])) == num_blocks
  if resnet == 101:
    out = jax.eval_shape(functools.partial(model.apply, train=False), shapes, x)
    assert out['branches'].shape == (2, 1, 125, 125, 40)
    assert out['ensemble'].shape == (1, 125, 125, 40)
    assert out['alpha'].shape == (2,)


# ----------------------------------------------------------------------------- fusion placement


def encoder_for(fusion, blocks):
  config = tiny_config(fusion, blocks=blocks)
  m = config.model
  norm = dict(use_running_average=True, momentum=0.1, epsilon=EPS, axis_name=None)
  return ResNetEncoder(tuple(blocks), norm, m.stem_width, tuple(m.widths), fusion, THR)


def block_names(blocks):
  return [f'layer{s + 1}_{i}' for s, n in enumerate(blocks) for i in range(n)]


def perturb_block_input(target, noise_seed=0):
  """Interceptor adding noise to branch 1 of `target`'s input; records every block output."""
  outs = {}

  def interceptor(next_fun, args, kwargs, ctx):
    mod = ctx.module
    if ctx.method_name == '__call__' and type(mod).__name__ == 'Bottleneck':
      x = args[0]
      if mod.name == target:
        noise = np.random.RandomState(noise_seed).randn(*x.shape[1:]).astype(np.float32)
        x = x.at[1].add(jnp.asarray(noise))
      out = next_fun(x, *args[1:], **kwargs)
      outs[mod.name] = (mod.fusion, np.asarray(out))
      return out
    return next_fun(*args, **kwargs)

  return outs, interceptor


BLOCKS = (1, 2, 3, 2)
CEN_EXCHANGING = ('layer1_0', 'layer2_1', 'layer3_1', 'layer4_0')


@pytest.mark.parametrize('fusion', ['asymfusion', 'none', 'cen', 'cen_some'])
def test_fusion_points_by_block(fusion):
  """Noise in branch 1's input of one block reaches branch 0's output of that block iff the
  block fuses: AsymFusion only in the last block of a stage with >= 2 blocks (docs/papers.md §3.2);
  never for 'none'; for 'cen' exactly in the blocks whose bn2 has (branch-0) scales below
  threshold, i.e. never when every scale is above it."""
  enc = encoder_for('cen' if fusion == 'cen_some' else fusion, BLOCKS)
  x = rand_images(2, seed=11)
  variables = fill_variables(
      jax.eval_shape(lambda x: enc.init(jax.random.key(0), x), x), seed=12)
  if fusion == 'asymfusion':
    expected_fused = {'layer2_1', 'layer3_2', 'layer4_1'}
  elif fusion == 'cen_some':
    expected_fused = set(CEN_EXCHANGING)
    for name in CEN_EXCHANGING:
      variables['params'][name]['bn2']['scale'][0, :3] = 0.001
  else:
    expected_fused = set()
  base, interceptor = perturb_block_input(None)
  with nn.intercept_methods(interceptor):
    enc.apply(variables, x)
  for name in block_names(BLOCKS):
    outs, interceptor = perturb_block_input(name)
    with nn.intercept_methods(interceptor):
      enc.apply(variables, x)
    delta0 = np.abs(outs[name][1][0] - base[name][1][0]).max()
    delta1 = np.abs(outs[name][1][1] - base[name][1][1]).max()
    assert delta1 > 1e-3, name   # the perturbation is live
    if name in expected_fused:
      assert delta0 > 1e-3, name
    else:
      assert delta0 == 0.0, name


def test_model_level_cross_branch_dependence():
  x = rand_images(2, seed=15)
  x_pert = x.at[1].add(1.0)
  for fusion, depends in (('asymfusion', True), ('none', False), ('cen', False)):
    model = build_model(tiny_config(fusion))
    variables = make_variables(model, x, seed=16)  # all |scale| >= 0.5: CEN exchanges nothing
    base = np.asarray(model.apply(variables, x, train=False)['branches'])
    pert = np.asarray(model.apply(variables, x_pert, train=False)['branches'])
    assert np.abs(pert[1] - base[1]).max() > 1e-3
    delta0 = np.abs(pert[0] - base[0]).max()
    if depends:
      assert delta0 > 1e-3, fusion
    else:
      assert delta0 == 0.0, fusion


def test_asymfusion_rejects_three_branches():
  model = build_model(tiny_config('asymfusion'))
  with pytest.raises(ValueError):
    variable_shapes(model, jax.ShapeDtypeStruct((3, 1, 32, 32, 3), jnp.float32))


def test_unknown_fusion_rejected():
  with pytest.raises(ValueError, match="config.model.fusion='concat': expected one of"):
    build_model(tiny_config('concat'))


# ----------------------------------------------------------------------------- bfloat16


def test_bfloat16_compute():
  x = rand_images(2, seed=17)
  model32 = build_model(tiny_config('cen', frozen_bn=False))
  model16 = build_model(tiny_config('cen', frozen_bn=False, dtype='bfloat16'))
  shapes16 = variable_shapes(model16, x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes16)), 'params/stats f32'
  variables = fill_variables(shapes16, seed=18)

  # Training mode (batch statistics, updated running statistics); one compilation.
  run = jax.jit(lambda v, x: [m.apply(v, x, train=True, mutable=['batch_stats'])
                              for m in (model32, model16)])
  (train32, stats32), (train16, stats16) = run(variables, x)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(stats16))
  for key in ('branches', 'ensemble', 'alpha'):
    assert train16[key].dtype == jnp.float32
  a16, a32 = np.asarray(train16['branches']), np.asarray(train32['branches'])
  assert np.isfinite(a16).all()
  scale = np.abs(a32).max()
  assert scale > 1e-3
  assert np.abs(a16 - a32).max() <= 0.1 * scale, (np.abs(a16 - a32).max(), scale)
  assert np.corrcoef(a16.ravel(), a32.ravel())[0, 1] > 0.99
  assert np.abs(a16 - a32).max() > 0  # it really computed in bfloat16
  for s16, s32 in zip(jax.tree.leaves(stats16), jax.tree.leaves(stats32)):
    np.testing.assert_allclose(np.asarray(s16), np.asarray(s32), rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- norms


def np_batchnorm(x, scale, bias, eps=EPS):
  x = x.astype(np.float64)
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


def bn_vars(c, seed, branches=None):
  rng = np.random.RandomState(seed)
  shape = (c,) if branches is None else (branches, c)
  return {'params': {'scale': rng.uniform(0.5, 2, shape).astype(np.float32),
                     'bias': rng.randn(*shape).astype(np.float32)},
          'batch_stats': {'mean': rng.randn(*shape).astype(np.float32),
                          'var': rng.uniform(0.5, 2, shape).astype(np.float32)}}


def test_batchnorm_training_matches_numpy_and_torch_running_stats():
  rng = np.random.RandomState(20)
  x = (3.0 + 2.0 * rng.randn(4, 5, 3, 6)).astype(np.float32)
  v = bn_vars(6, seed=21)
  bn = layers.BatchNorm(use_running_average=False, momentum=0.1)
  y, new = bn.apply(v, jnp.asarray(x), mutable=['batch_stats'])
  ref, mean, var = np_batchnorm(x, v['params']['scale'], v['params']['bias'])
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  n = 4 * 5 * 3
  np.testing.assert_allclose(np.asarray(new['batch_stats']['mean']),
                             0.9 * v['batch_stats']['mean'] + 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new['batch_stats']['var']),
                             0.9 * v['batch_stats']['var'] + 0.1 * var * n / (n - 1),
                             rtol=1e-5, atol=1e-6)
  # Freshly initialised statistics are torch's (0, 1).
  init = bn.init(jax.random.key(0), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(init['batch_stats']['mean']), np.zeros(6))
  np.testing.assert_array_equal(np.asarray(init['batch_stats']['var']), np.ones(6))
  np.testing.assert_array_equal(np.asarray(init['params']['scale']), np.ones(6))
  np.testing.assert_array_equal(np.asarray(init['params']['bias']), np.zeros(6))


def test_batchnorm_frozen_uses_and_keeps_running_stats():
  rng = np.random.RandomState(22)
  x = rng.randn(2, 3, 4, 5).astype(np.float32)
  v = bn_vars(5, seed=23)
  bn = layers.BatchNorm(use_running_average=True)
  y, new = bn.apply(v, jnp.asarray(x), mutable=['batch_stats'])
  s, b = v['params']['scale'], v['params']['bias']
  mu, var = v['batch_stats']['mean'], v['batch_stats']['var']
  np.testing.assert_allclose(np.asarray(y), (x - mu) / np.sqrt(var + EPS) * s + b,
                             rtol=1e-5, atol=1e-5)
  assert_trees_equal(new['batch_stats'], v['batch_stats'])


def test_batchnorm_bfloat16_output_float32_stats():
  x = np.random.RandomState(24).randn(2, 3, 3, 4).astype(np.float32)
  v = bn_vars(4, seed=25)
  y, new = layers.BatchNorm(use_running_average=False, dtype=jnp.bfloat16).apply(
      v, jnp.asarray(x, jnp.bfloat16), mutable=['batch_stats'])
  assert y.dtype == jnp.bfloat16
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(new))
  ref, _, _ = np_batchnorm(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32),
                           v['params']['scale'], v['params']['bias'])
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2)


def test_private_batchnorm_per_branch():
  rng = np.random.RandomState(26)
  m, c = 3, 4
  x = (rng.randn(m, 2, 3, 5, c) * np.array([1, 2, 3])[:, None, None, None, None]
       + np.array([0, 5, -5])[:, None, None, None, None]).astype(np.float32)
  v = bn_vars(c, seed=27, branches=m)
  pbn = layers.PrivateBatchNorm(use_running_average=False, momentum=0.1)
  y, new = pbn.apply(v, jnp.asarray(x), mutable=['batch_stats'])
  n = 2 * 3 * 5
  for b in range(m):
    ref, mean, var = np_batchnorm(x[b], v['params']['scale'][b], v['params']['bias'][b])
    np.testing.assert_allclose(np.asarray(y[b]), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new['batch_stats']['mean'][b]),
                               0.9 * v['batch_stats']['mean'][b] + 0.1 * mean,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new['batch_stats']['var'][b]),
                               0.9 * v['batch_stats']['var'][b] + 0.1 * var * n / (n - 1),
                               rtol=1e-5, atol=1e-6)
  shapes = jax.eval_shape(lambda x: pbn.init(jax.random.key(0), x), jnp.asarray(x))
  assert jax.tree.map(lambda a: a.shape, shapes) == {
      'params': {'scale': (m, c), 'bias': (m, c)},
      'batch_stats': {'mean': (m, c), 'var': (m, c)}}


@pytest.mark.parametrize('private', [False, True])
def test_batchnorm_pmap_equals_global_batch(private):
  ndev = jax.device_count()
  assert ndev == 8
  rng = np.random.RandomState(28)
  c, per = 3, 2
  if private:
    x = (rng.randn(2, ndev * per, 3, 3, c) + 1.5).astype(np.float32)
    v = bn_vars(c, seed=29, branches=2)
    make = lambda **kw: layers.PrivateBatchNorm(use_running_average=False, **kw)
    shard = lambda a: a.reshape(2, ndev, per, *a.shape[2:]).swapaxes(0, 1)
    unshard = lambda a: np.asarray(a).swapaxes(0, 1).reshape(x.shape)
  else:
    x = (rng.randn(ndev * per, 3, 3, c) * 2 + 1.5).astype(np.float32)
    v = bn_vars(c, seed=29)
    make = lambda **kw: layers.BatchNorm(use_running_average=False, **kw)
    shard = lambda a: a.reshape(ndev, per, *a.shape[1:])
    unshard = lambda a: np.asarray(a).reshape(x.shape)
  y_single, s_single = make().apply(v, jnp.asarray(x), mutable=['batch_stats'])
  bn = make(axis_name='batch')
  fn = jax.pmap(lambda v, x: bn.apply(v, x, mutable=['batch_stats']), axis_name='batch',
                in_axes=(None, 0))
  y_multi, s_multi = fn(v, jnp.asarray(shard(x)))
  np.testing.assert_allclose(unshard(y_multi), np.asarray(y_single), rtol=1e-5, atol=1e-5)
  for key in ('mean', 'var'):
    got = np.asarray(s_multi['batch_stats'][key])
    for d in range(ndev):   # every device holds the global statistics
      np.testing.assert_allclose(got[d], np.asarray(s_single['batch_stats'][key]),
                                 rtol=1e-5, atol=1e-6)
  # And the per-device result really differs from unsynchronised BN.
  y_local, _ = make().apply(v, jnp.asarray(shard(x)[0]), mutable=['batch_stats'])
  assert np.abs(np.asarray(y_local) - np.asarray(y_multi[0])).max() > 1e-2


def test_instancenorm_matches_numpy_and_torch_running_stats():
  rng = np.random.RandomState(30)
  n, h, w, c = 3, 4, 5, 2
  x = (rng.randn(n, h, w, c) * rng.uniform(0.5, 3, (n, 1, 1, c))
       + rng.randn(n, 1, 1, c) * 4).astype(np.float32)
  v = bn_vars(c, seed=31)
  inorm = layers.InstanceNorm(use_running_average=False, track_running_stats=True)
  y, new = inorm.apply(v, jnp.asarray(x), mutable=['batch_stats'])
  xd = x.astype(np.float64)
  mean = xd.mean(axis=(1, 2), keepdims=True)
  var = xd.var(axis=(1, 2), keepdims=True)
  ref = (xd - mean) / np.sqrt(var + EPS) * v['params']['scale'] + v['params']['bias']
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  k = h * w
  run_mean = 0.9 * v['batch_stats']['mean'] + 0.1 * mean.reshape(n, c).mean(0)
  run_var = 0.9 * v['batch_stats']['var'] + 0.1 * (var.reshape(n, c) * k / (k - 1)).mean(0)
  np.testing.assert_allclose(np.asarray(new['batch_stats']['mean']), run_mean, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(new['batch_stats']['var']), run_var, rtol=1e-5,
                             atol=1e-6)
  # Running-average mode normalises with the stored statistics and leaves them untouched.
  frozen = layers.InstanceNorm(use_running_average=True, track_running_stats=True)
  y2, new2 = frozen.apply(v, jnp.asarray(x), mutable=['batch_stats'])
  mu, vr = v['batch_stats']['mean'], v['batch_stats']['var']
  np.testing.assert_allclose(np.asarray(y2),
                             (xd - mu) / np.sqrt(vr + EPS) * v['params']['scale']
                             + v['params']['bias'], rtol=1e-5, atol=1e-5)
  assert_trees_equal(new2['batch_stats'], v['batch_stats'])


def test_private_instancenorm_per_branch():
  rng = np.random.RandomState(32)
  x = rng.randn(2, 2, 3, 3, 4).astype(np.float32)
  v = bn_vars(4, seed=33, branches=2)
  y = layers.PrivateInstanceNorm(use_running_average=False).apply(v, jnp.asarray(x),
                                                                  mutable=['batch_stats'])[0]
  for b in range(2):
    xd = x[b].astype(np.float64)
    mean = xd.mean(axis=(1, 2), keepdims=True)
    var = xd.var(axis=(1, 2), keepdims=True)
    ref = (xd - mean) / np.sqrt(var + EPS) * v['params']['scale'][b] + v['params']['bias'][b]
    np.testing.assert_allclose(np.asarray(y[b]), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- resize, pool


HAND_INPUT = np.array([[1., 0., 4.],
                       [0., 2., 0.]], np.float32)


def test_resize_bilinear_align_corners_hand_computed():
  # src_h = i * (2-1)/(3-1) = 0, .5, 1;  src_w = j * (3-1)/(5-1) = 0, .5, 1, 1.5, 2.
  expected = np.array([[1.0, 0.5, 0.0, 2.0, 4.0],
                       [0.5, 0.75, 1.0, 1.5, 2.0],
                       [0.0, 1.0, 2.0, 1.0, 0.0]], np.float32)
  out = layers.resize(jnp.asarray(HAND_INPUT[:, :, None]), (3, 5), 'bilinear_align_corners')
  np.testing.assert_allclose(np.asarray(out)[..., 0], expected, rtol=1e-6, atol=1e-7)


def test_resize_bilinear_half_pixel_hand_computed():
  # src = (o + .5) * in/out - .5, negative clamped to 0, index clamped to in - 1:
  # rows: -1/6 -> 0, .5, 7/6 -> row 1;  cols: -.2 -> 0, .4, 1.0, 1.6, 2.2 -> col 2.
  expected = np.array([[1.0, 0.6, 0.0, 2.4, 4.0],
                       [0.5, 0.7, 1.0, 1.6, 2.0],
                       [0.0, 0.8, 2.0, 0.8, 0.0]], np.float32)
  out = layers.resize(jnp.asarray(HAND_INPUT[:, :, None]), (3, 5), 'bilinear')
  np.testing.assert_allclose(np.asarray(out)[..., 0], expected, rtol=1e-6, atol=1e-6)


def np_bilinear(x, size, align_corners):
  """Per-pixel torch F.interpolate(mode='bilinear') reference on [H, W, C]."""
  h, w = x.shape[:2]
  oh, ow = size
  out = np.zeros((oh, ow, x.shape[2]), np.float64)

  def src(o, n_in, n_out):
    if align_corners:
      return o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    return max((o + 0.5) * n_in / n_out - 0.5, 0.0)

  for i in range(oh):
    sy = src(i, h, oh)
    y0 = min(int(math.floor(sy)), h - 1)
    y1 = min(y0 + 1, h - 1)
    fy = sy - y0
    for j in range(ow):
      sx = src(j, w, ow)
      x0 = min(int(math.floor(sx)), w - 1)
      x1 = min(x0 + 1, w - 1)
      fx = sx - x0
      out[i, j] = ((1 - fy) * ((1 - fx) * x[y0, x0] + fx * x[y0, x1])
                   + fy * ((1 - fx) * x[y1, x0] + fx * x[y1, x1]))
  return out


@pytest.mark.parametrize('method', ['bilinear', 'bilinear_align_corners'])
@pytest.mark.parametrize('size_in, size_out', [((5, 7), (13, 10)), ((12, 9), (5, 4)),
                                               ((4, 6), (1, 3))])
def test_resize_bilinear_random_against_loops(method, size_in, size_out):
  x = np.random.RandomState(34).randn(*size_in, 3).astype(np.float32)
  ref = np_bilinear(x, size_out, method == 'bilinear_align_corners')
  out = layers.resize(jnp.asarray(x[None, None]), size_out, method)
  assert out.shape == (1, 1) + tuple(size_out) + (3,)
  np.testing.assert_allclose(np.asarray(out)[0, 0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size_in, size_out', [((7, 9), (20, 31)), ((16, 12), (9, 5)),
                                               ((125, 125), (480, 640))])
def test_resize_bicubic_matches_cv2(size_in, size_out):
  cv2 = pytest.importorskip('cv2')
  x = np.random.RandomState(35).randn(*size_in, 3).astype(np.float32)
  ref = cv2.resize(x, (size_out[1], size_out[0]), interpolation=cv2.INTER_CUBIC)
  out = layers.resize(jnp.asarray(x), size_out, 'bicubic')
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


def test_resize_bilinear_matches_cv2_linear():
  cv2 = pytest.importorskip('cv2')
  x = np.random.RandomState(36).randn(11, 8, 3).astype(np.float32)
  for size in ((25, 19), (6, 5)):
    ref = cv2.resize(x, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    out = layers.resize(jnp.asarray(x), size, 'bilinear')
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


def test_resize_bicubic_hand_computed_row():
  # 1 x 2 -> 1 x 4, cv2 cubic (a = -0.75), replicated border. Output col j samples
  # src = (j + .5) / 2 - .5 = -.25, .25, .75, 1.25 over [x0, x1] = [0, 1] (border-replicated).
  a = -0.75

  def w(t):
    t = abs(t)
    if t <= 1:
      return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
      return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0

  row = [0.0, 1.0]
  expected = []
  for j in range(4):
    s = (j + 0.5) / 2 - 0.5
    base = math.floor(s)
    expected.append(sum(w(s - (base + k)) * row[min(max(base + k, 0), 1)] for k in (-1, 0, 1, 2)))
  # Note the overshoot of a = -0.75 cubic: values fall outside [0, 1].
  assert expected[0] < 0 and expected[3] > 1
  out = layers.resize(jnp.asarray([[[0.0], [1.0]]]), (1, 4), 'bicubic')
  np.testing.assert_allclose(np.asarray(out)[0, :, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('method', ['bilinear', 'bilinear_align_corners', 'bicubic'])
def test_resize_same_size_is_identity(method):
  x = jnp.asarray(np.random.RandomState(37).randn(2, 1, 6, 7, 3).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(layers.resize(x, (6, 7), method)), np.asarray(x))
  # Interpolation matrices at equal size are the identity too (no half-pixel drift).
  np.testing.assert_allclose(layers.interpolation_matrix(6, 6, method), np.eye(6), atol=1e-6)


def test_resize_unknown_method():
  with pytest.raises(ValueError):
    layers.resize(jnp.zeros((1, 2, 2, 1)), (3, 3), 'nearest_magic')


def np_max_pool(x, k, s, p):
  """[N, H, W, C] max pool with -inf padding (torch MaxPool2d)."""
  n, h, w, c = x.shape
  xp = np.full((n, h + 2 * p, w + 2 * p, c), -np.inf, x.dtype)
  xp[:, p:p + h, p:p + w] = x
  oh, ow = conv_out(h, k, s, p), conv_out(w, k, s, p)
  out = np.zeros((n, oh, ow, c), x.dtype)
  for i in range(oh):
    for j in range(ow):
      out[:, i, j] = xp[:, i * s:i * s + k, j * s:j * s + k].max(axis=(1, 2))
  return out


@pytest.mark.parametrize('k, s, p', [(3, 2, 1), (5, 1, 2)])
@pytest.mark.parametrize('h, w', [(7, 9), (8, 5)])
def test_max_pool_against_numpy(k, s, p, h, w):
  # All-negative values: zero padding would show up as 0 at the borders.
  x = -np.abs(np.random.RandomState(h * w + k).randn(2, 3, h, w, 4)).astype(np.float32) - 0.1
  out = np.asarray(layers.max_pool(jnp.asarray(x), k, s, p))
  ref = np.stack([np_max_pool(x[m], k, s, p) for m in range(2)])
  assert out.shape == ref.shape
  np.testing.assert_array_equal(out, ref)
  assert (out < 0).all()


@pytest.mark.parametrize('k, stride, pad', [(1, 2, 0), (1, 1, 0), (3, 2, 1), (7, 2, 3)])
def test_shared_conv_against_numpy(k, stride, pad):
  rng = np.random.RandomState(38)
  x = rng.randn(2, 1, 7, 6, 3).astype(np.float32)
  conv = layers.SharedConv(4, k, stride, pad, use_bias=True)
  v = fill_variables(jax.eval_shape(lambda x: conv.init(jax.random.key(0), x), jnp.asarray(x)))
  kern, bias = v['params']['kernel'], v['params']['bias']
  out = np.asarray(conv.apply(v, jnp.asarray(x)))
  xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh, ow = conv_out(7, k, stride, pad), conv_out(6, k, stride, pad)
  ref = np.zeros((2, 1, oh, ow, 4))
  for i in range(oh):
    for j in range(ow):
      patch = xp[:, :, i * stride:i * stride + k, j * stride:j * stride + k]
      ref[:, :, i, j] = np.einsum('mnhwc,hwcd->mnd', patch, kern) + bias
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
