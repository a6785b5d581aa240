"""The TokenFusion translation networks (cen_jax/models/mit_translation.py) and their torch key
map (cen_jax/tokenfusion_io.py), without torch: official parameter counts of gen/dis b0..b5
(jax.eval_shape, no compute), output shapes, the late ensemble, fusions without token scores,
input errors, the key map. Parity with the official code:
tests/parity/test_mit_translation_torch.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import tokenfusion_io
from cen_jax.fusion import registry
from cen_jax.models import count_params, path_str
from cen_jax.models import mit_translation as mt

# The official model_cfg.gen_bX() / dis_bX() with cfg.num_parallel = 2, counted as
# sum(p.numel() for p in model.parameters()). Produced once by instantiating
# tests/helpers/torch_reference_mit_translation.py (ref.gen(arch), ref.dis(arch)) in
# .venv-torch; the reference's state_dict keys, shapes, drop-path rates and counts were checked
# equal to the official image2image_translation/models/model_pruning.py's (run with timm and
# mmcv stubbed out), for all six archs.
OFFICIAL_GEN_PARAMS = {'b0': 17_609_257, 'b1': 70_036_537, 'b2': 131_105_593,
                       'b3': 232_530_745, 'b4': 333_431_609, 'b5': 430_892_857}
OFFICIAL_DIS_PARAMS = {'b0': 12_173_345, 'b1': 48_435_265, 'b2': 85_290_433,
                       'b3': 136_003_009, 'b4': 186_453_441, 'b5': 235_184_065}
OFFICIAL_KEYS = {'gen_b0': 655, 'dis_b0': 300}  # len(state_dict()) of the official models

SIZE = 64  # parameter shapes do not depend on it; the smallest S the official strides allow x2


def _x(m=2, n=1, size=SIZE):
  return jax.ShapeDtypeStruct((m, n, size, size, 3), jnp.float32)


@pytest.mark.parametrize('arch', sorted(mt.TRANSLATION_ARCHS))
def test_official_parameter_counts_and_shapes(arch):
  gen = mt.mit_generator(arch)
  out, variables = jax.eval_shape(
      lambda x: gen.init_with_output(jax.random.key(0), x, train=False, deterministic=True),
      _x())
  assert count_params(variables['params']) == OFFICIAL_GEN_PARAMS[arch]
  assert out['branches'].shape == (2, 1, SIZE, SIZE, 3)
  assert out['ensemble'].shape == (1, SIZE, SIZE, 3)
  assert out['alpha'].shape == (2,)
  assert [m.shape for m in out['masks']] == [(2, 1, SIZE // 2 ** s, SIZE // 2 ** s)
                                             for s in range(1, 6)]
  dis = mt.mit_discriminator(arch)
  logits, dis_vars = jax.eval_shape(
      lambda x, y: dis.init_with_output(jax.random.key(0), x, y, train=False),
      _x(), jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))
  assert count_params(dis_vars['params']) == OFFICIAL_DIS_PARAMS[arch]
  assert logits.shape == (2, 1, SIZE // 32, SIZE // 32, 1)


# ----------------------------------------------------------------------------- tiny networks

TINY = dict(embed_dims=(8, 16, 16, 32, 32), depths=(1, 2, 1, 1, 2))
SMALL = 32


def tiny_gen(fusion='tokenfusion', **fields):
  return mt.MiTGenerator(**TINY, fusion=fusion, **fields)


@functools.lru_cache(maxsize=None)
def tiny_shapes(fusion='tokenfusion', kind='gen'):
  if kind == 'dis':
    model = mt.MiTDiscriminator(**TINY)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, x, train=False),
                          _x(size=SMALL))
  return jax.eval_shape(lambda x: tiny_gen(fusion).init(jax.random.key(0), x, train=False,
                                                        deterministic=True), _x(size=SMALL))


def numpy_variables(shapes, seed=0):
  """Random variables of the given shapes drawn by numpy: kernels N(0, 0.2), norm scales
  around 1, biases and alpha N(0, 0.1) (compiling `init` costs more than the forward)."""
  rng = np.random.RandomState(seed)

  def make(path, s):
    name = path_str(path).split('/')[-1]
    if name == 'scale':
      return (1 + 0.2 * rng.randn(*s.shape)).astype(np.float32)
    scale = 0.2 if name == 'kernel' else 0.1
    return (scale * rng.randn(*s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(make, shapes)


@functools.partial(jax.jit, static_argnames=('fusion', 'deterministic'))
def run_tiny(variables, x, fusion='tokenfusion', deterministic=True, key=None):
  rngs = None if deterministic else {'dropout': key}
  return tiny_gen(fusion).apply(variables, x, train=False, deterministic=deterministic,
                                rngs=rngs)


def test_ensemble_is_the_softmax_alpha_weighted_sum_and_the_upsample_norms_are_unused():
  variables = numpy_variables(tiny_shapes())
  variables['params']['alpha'] = np.array([0.3, -1.2], np.float32)
  x = np.random.RandomState(1).randn(2, 2, SMALL, SMALL, 3).astype(np.float32)
  out = run_tiny(variables, x)
  e = np.exp([0.3, -1.2])
  w = e / e.sum()
  np.testing.assert_allclose(out['alpha'], w, rtol=1e-6)
  branches = np.asarray(out['branches'])
  np.testing.assert_allclose(out['ensemble'], w[0] * branches[0] + w[1] * branches[1],
                             rtol=1e-6, atol=1e-7)
  assert np.abs(branches).max() <= 1.0 and np.abs(branches[0] - branches[1]).max() > 1e-3
  # PatchUpsample's norm: official parameters that its forward never applies
  changed = jax.tree_util.tree_map(np.copy, variables)
  for k in range(5):
    norm = changed['params'][f'patch_embed_dec_{k}']['norm']
    norm['scale'], norm['bias'] = norm['scale'] * 3.0, norm['bias'] + 1.0
  np.testing.assert_array_equal(run_tiny(changed, x)['branches'], branches)
  # stochastic depth (official drop_path_rate 0.1) draws only when not deterministic
  key = jax.random.key(0)
  drawn = run_tiny(variables, x, deterministic=False, key=key)
  assert np.abs(np.asarray(drawn['branches']) - branches).max() > 1e-4
  np.testing.assert_array_equal(run_tiny(variables, x, deterministic=False, key=key)['branches'],
                                drawn['branches'])


@pytest.mark.parametrize('fusion', ['none', 'cen'])
def test_fusions_without_token_scores_build_no_predictors_and_return_no_masks(fusion):
  out, variables = jax.eval_shape(
      lambda x: tiny_gen(fusion).init_with_output(jax.random.key(0), x, train=False,
                                                  deterministic=True), _x(size=SMALL))
  assert out['masks'] == []
  assert not [k for k in variables['params'] if k.startswith('score_predictor_')]
  assert sorted(k for k in tiny_shapes()['params'] if k.startswith('score_predictor_')) == [
      f'score_predictor_{s}' for s in range(5)]


def test_token_fusion_passes_tokens_through_without_scores():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 1, 4, 4, 8).astype(np.float32))
  site = registry.Site('block_enc_0_0', 0, 0, 2, 0.02, {}, scores=None)
  assert registry.token_fusion(x, site) is x
  scores = jnp.zeros((2, 1, 4, 4))  # every token under the threshold: swapped (and scaled by 0)
  out = registry.token_fusion(x, registry.Site('b', 0, 1, 2, 0.02, {}, scores=scores))
  np.testing.assert_array_equal(out, jnp.zeros_like(x))


def test_errors_are_one_line():
  for bad in (_x(size=48), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)):
    with pytest.raises(ValueError, match='divisible by 32') as e:
      jax.eval_shape(lambda x: tiny_gen().init(jax.random.key(0), x, train=False,
                                               deterministic=True), bad)
    assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='divisible by 32'):
    jax.eval_shape(lambda x: mt.MiTDiscriminator(**TINY).init(jax.random.key(0), x, x,
                                                              train=False), _x(size=48))
  with pytest.raises(ValueError, match='at least 2'):
    jax.eval_shape(lambda x: tiny_gen().init(jax.random.key(0), x, train=False,
                                             deterministic=True), _x(m=1, size=SMALL))
  for build in (mt.mit_generator, mt.mit_discriminator):
    with pytest.raises(ValueError, match="arch='b9': expected one of"):
      build('b9')


def test_pixel_shuffle_is_torchs():
  x = np.arange(2 * 3 * 5 * 8, dtype=np.float32).reshape(2, 3, 5, 8)  # [N, H, W, C]
  y = np.asarray(mt.pixel_shuffle(jnp.asarray(x)))
  assert y.shape == (2, 6, 10, 2)
  for h, w, c, i, j in ((0, 0, 0, 0, 0), (2, 4, 1, 1, 0), (1, 3, 1, 1, 1), (2, 1, 0, 0, 1)):
    assert y[1, 2 * h + i, 2 * w + j, c] == x[1, h, w, c * 4 + i * 2 + j]


# ----------------------------------------------------------------------------- torch key map

def test_torch_key_map_follows_the_official_names():
  shapes = jax.eval_shape(lambda x: mt.mit_generator('b0').init(
      jax.random.key(0), x, train=False, deterministic=True), _x())
  keys = tokenfusion_io.translation_torch_keys(shapes)
  assert keys['params/patch_embed_enc_0/proj/kernel'] == ('patch_embed_enc.0.proj.module.weight',)
  assert keys['params/patch_embed_enc_0/norm/scale'] == (
      'patch_embed_enc.0.norm.lrnorm_0.weight', 'patch_embed_enc.0.norm.lrnorm_1.weight')
  assert keys['params/block_enc_1_0/attn/sr/bias'] == ('block_enc.1.0.attn.sr.module.bias',)
  assert keys['params/block_enc_1_0/attn/norm/bias'] == (
      'block_enc.1.0.attn.norm.lrnorm_0.bias', 'block_enc.1.0.attn.norm.lrnorm_1.bias')
  assert keys['params/block_enc_4_1/mlp/dwconv/kernel'] == (
      'block_enc.4.1.mlp.dwconv.dwconv.module.weight',)
  assert keys['params/score_predictor_3/fc4/kernel'] == (
      'score_predictor.3.score_nets.0.7.weight', 'score_predictor.3.score_nets.1.7.weight')
  assert keys['params/score_predictor_0/norm/bias'][1] == 'score_predictor.0.score_nets.1.0.bias'
  assert keys['params/norm_enc_2/scale'][0] == 'norm_enc.2.lrnorm_0.weight'
  assert keys['params/patch_embed_dec_4/norm/scale'][1] == 'patch_embed_dec.4.norm.lrnorm_1.weight'
  assert keys['params/block_dec_3_1/norm2/bias'][0] == 'block_dec.3.1.norm2.lrnorm_0.bias'
  assert keys['params/norm_dec_0/scale'][1] == 'norm_dec.0.lrnorm_1.weight'
  assert keys['params/project/kernel'] == ('project.module.weight',)
  assert keys['params/alpha'] == ('alpha',)
  all_keys = [k for ks in keys.values() for k in ks]
  assert len(all_keys) == len(set(all_keys)) == OFFICIAL_KEYS['gen_b0']
  dis = jax.eval_shape(lambda x: mt.mit_discriminator('b0').init(jax.random.key(0), x, x,
                                                                 train=False), _x())
  dis_keys = [k for ks in tokenfusion_io.translation_torch_keys(dis).values() for k in ks]
  assert len(dis_keys) == len(set(dis_keys)) == OFFICIAL_KEYS['dis_b0']


@pytest.mark.parametrize('kind', ['gen', 'dis'])
def test_export_then_import_is_the_identity(kind):
  variables = numpy_variables(tiny_shapes(kind=kind))
  network = 'generator' if kind == 'gen' else 'discriminator'
  export = getattr(tokenfusion_io, f'export_translation_{network}')
  load = getattr(tokenfusion_io, f'import_translation_{network}')
  exported = export(variables)
  assert all(k.startswith('module.') for k in exported)
  assert exported['module.block_enc.0.0.attn.q.module.weight'].shape == (8, 8)
  assert exported['module.patch_embed_enc.1.proj.module.weight'].shape == (16, 8, 3, 3)
  back = load(exported, tiny_shapes(kind=kind))
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)
  bare = load({k.removeprefix('module.'): v for k, v in exported.items()}, tiny_shapes(kind=kind))
  jax.tree_util.tree_map(np.testing.assert_array_equal, bare, variables)


def test_import_rejects_unknown_missing_and_misshapen_keys():
  exported = tokenfusion_io.export_translation_generator(numpy_variables(tiny_shapes()))
  load = tokenfusion_io.import_translation_generator
  with pytest.raises(ValueError, match="'module.extra' is not in the model"):
    load({**exported, 'module.extra': np.zeros(1)}, tiny_shapes())
  missing = dict(exported)
  del missing['module.norm_dec.3.lrnorm_1.bias']
  with pytest.raises(ValueError, match="lacks key 'norm_dec.3.lrnorm_1.bias'"):
    load(missing, tiny_shapes())
  wrong = {**exported, 'module.alpha': np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match="'module.alpha' has shape"):
    load(wrong, tiny_shapes())
  # a discriminator checkpoint is not a generator's
  dis = tokenfusion_io.export_translation_discriminator(numpy_variables(tiny_shapes(kind='dis')))
  with pytest.raises(ValueError, match='lacks key|shape'):
    load(dis, tiny_shapes())
