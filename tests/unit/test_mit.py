"""The TokenFusion MiT encoder and SegFormer head (cen_jax/models/mit.py, segformer.py) and their
torch key map (cen_jax/tokenfusion_io.py), without torch: shapes and official parameter counts
of MiT-B0..B5 at 512x512 (jax.eval_shape, no compute), branch symmetry without fusion, the
token exchange, the key map. Parity with the official model: tests/parity/test_mit_torch.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cen_jax import tokenfusion_io
from cen_jax.models import count_params, path_str
from cen_jax.models import mit
from cen_jax.models.segformer import TokenFusionSegmenter

# Official mix_transformer.mit_bX() (M = 2, score predictors included) and WeTr heads
# (embedding 256, 40 classes), counted as the official compute_params (parameters only).
OFFICIAL_MIT_PARAMS = {'mit_b0': 3_643_760, 'mit_b1': 14_425_808, 'mit_b2': 25_482_320,
                       'mit_b3': 45_381_200, 'mit_b4': 62_172_112, 'mit_b5': 82_795_856}
OFFICIAL_HEAD_PARAMS = {'mit_b0': 405_032}  # B1..B5 (widths 64, 128, 320, 512): 536,104
WIDE_HEAD_PARAMS = 536_104


@pytest.mark.parametrize('backbone', sorted(mit.MIT_ARCHS))
def test_shapes_and_official_parameter_counts_at_512(backbone):
  model = TokenFusionSegmenter(40, backbone)
  x = jax.ShapeDtypeStruct((2, 1, 512, 512, 3), jnp.float32)
  out, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, train=False), x)
  assert out['branches'].shape == (2, 1, 128, 128, 40)
  assert out['ensemble'].shape == (1, 128, 128, 40)
  assert out['alpha'].shape == (2,)
  arch = mit.MIT_ARCHS[backbone]
  expected = [(2, 1, 512 // stride, 512 // stride)
              for stride, depth in zip((4, 8, 16, 32), arch['depths']) for _ in range(depth)]
  assert [m.shape for m in out['masks']] == expected
  params = variables['params']
  for s, dim in enumerate(arch['embed_dims']):
    assert params['decoder'][f'linear_c{s + 1}']['proj']['kernel'].shape == (dim, 256)
    assert params['encoder'][f'norm{s + 1}']['scale'].shape == (2, dim)
  assert count_params(params['encoder']) == OFFICIAL_MIT_PARAMS[backbone]
  head = OFFICIAL_HEAD_PARAMS.get(backbone, WIDE_HEAD_PARAMS)
  assert count_params(params['decoder']) == head
  assert count_params(params) == OFFICIAL_MIT_PARAMS[backbone] + head + 2


SMALL = 32  # B0 at 32x32: stage maps 8, 4, 2, 1


def numpy_variables(model, x_shape, seed=0):
  """Random variables of the model's shapes drawn by numpy (compiling `init` costs more than
  the forward): weights N(0, 0.05), norm scales 1, running variances 1, the rest 0."""
  rng = np.random.RandomState(seed)
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

  def make(path, s):
    name = path_str(path).split('/')[-1]
    if name in ('scale', 'var', 'alpha'):
      return np.ones(s.shape, np.float32)
    if name == 'kernel':
      return (0.05 * rng.randn(*s.shape)).astype(np.float32)
    return np.zeros(s.shape, np.float32)

  return jax.tree_util.tree_map_with_path(make, shapes)


@functools.lru_cache(maxsize=None)
def none_variables():
  model = TokenFusionSegmenter(7, 'mit_b0', fusion='none')
  return numpy_variables(model, (2, 1, SMALL, SMALL, 3))


@jax.jit
def apply_none(variables, x):
  return TokenFusionSegmenter(7, 'mit_b0', fusion='none').apply(variables, x, train=False)


def symmetric_run(seed, same_norms):
  """Branch logits [2, ...] of fusion 'none' on one image given to both branches, with every
  private LayerNorm's scale and bias random (the same for both branches if same_norms)."""
  rng = np.random.RandomState(seed)

  def randomise(path, leaf):
    if 'norm' not in path_str(path) or leaf.shape[0] != 2:
      return leaf
    rows = rng.uniform(0.5, 1.5, leaf.shape) if path_str(path).endswith('scale') else \
        rng.normal(0, 0.2, leaf.shape)
    return jnp.asarray(np.broadcast_to(rows[:1], leaf.shape) if same_norms else rows,
                       jnp.float32)

  params = none_variables()['params']
  encoder = jax.tree_util.tree_map_with_path(randomise, params['encoder'])
  variables = {**none_variables(), 'params': {**params, 'encoder': encoder}}
  image = rng.randn(1, 1, SMALL, SMALL, 3).astype(np.float32)
  x = jnp.asarray(np.concatenate([image, image]))
  return np.asarray(apply_none(variables, x)['branches'])


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_without_fusion_identical_inputs_and_norms_give_identical_branches(seed):
  """Shared weights + private LayerNorms holding the same values = the same network twice."""
  out = symmetric_run(seed, same_norms=True)
  np.testing.assert_allclose(out[0], out[1], rtol=0, atol=1e-6 * np.abs(out).max())


def test_without_fusion_different_norms_give_different_branches():
  """The control: the property above is not vacuous."""
  out = symmetric_run(0, same_norms=False)
  assert np.abs(out[0] - out[1]).max() > 1e-3


def test_token_exchange_with_all_low_scores_swaps_the_branches():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 3, 4, 5, 6).astype(np.float32))
  low = jnp.full((2, 3, 4, 5), 0.01)
  np.testing.assert_array_equal(mit.token_exchange(x, low, mit.MASK_THRESHOLD), x[::-1])
  high = jnp.full((2, 3, 4, 5), 0.02)  # >= threshold keeps
  np.testing.assert_array_equal(mit.token_exchange(x, high, mit.MASK_THRESHOLD), x)


def test_token_exchange_is_per_token_and_takes_the_mean_of_the_others_beyond_two():
  rng = np.random.RandomState(1)
  x = rng.randn(3, 2, 4, 4, 5).astype(np.float32)
  scores = rng.uniform(0, 0.04, (3, 2, 4, 4)).astype(np.float32)
  out = np.asarray(mit.token_exchange(jnp.asarray(x), jnp.asarray(scores), 0.02))
  for m in range(3):
    others = np.mean([x[k] for k in range(3) if k != m], axis=0)
    expected = np.where(scores[m, ..., None] >= 0.02, x[m], others)
    np.testing.assert_allclose(out[m], expected, rtol=1e-6, atol=1e-6)


def test_mask_l1_is_the_official_sum():
  masks = [jnp.full((2, 1, 4, 4), 0.5), jnp.full((2, 1, 2, 2), -0.25)]
  assert float(mit.mask_l1(masks)) == pytest.approx(2 * 16 * 0.5 + 2 * 4 * 0.25)


def test_stochastic_depth_draws_per_branch_and_sample():
  x = jnp.ones((2, 64, 3, 3, 4))
  y = np.asarray(mit.stochastic_depth(x, 0.5, jax.random.key(0)))
  per_sample = y.reshape(2, 64, -1)
  assert set(np.unique(per_sample)) == {0.0, 2.0}
  assert (per_sample.min(-1) == per_sample.max(-1)).all()  # one draw per (branch, sample)
  assert (per_sample[0, :, 0] != per_sample[1, :, 0]).any()


def test_fusion_checks():
  x = jnp.zeros((1, 1, SMALL, SMALL, 3))
  with pytest.raises(ValueError, match='at least 2'):
    mit.mit('mit_b0').init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match='tokenfusion'):  # 'cen' fits the MiT since issue 28
    mit.mit('mit_b0', fusion='average').init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match='mit_b0'):
    mit.mit('mit_b9')


# ----------------------------------------------------------------------------- torch key map

@functools.lru_cache(maxsize=None)
def b0_shapes():
  x = jnp.zeros((2, 1, SMALL, SMALL, 3))
  return jax.eval_shape(
      lambda: TokenFusionSegmenter(40, 'mit_b0').init(jax.random.key(0), x, train=False))


def random_variables(seed=0):
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(lambda s: rng.randn(*s.shape).astype(np.float32), b0_shapes())


def test_torch_key_map_follows_the_official_names():
  keys = tokenfusion_io.mit_torch_keys(b0_shapes())
  assert keys['params/encoder/patch_embed1/proj/kernel'] == (
      'encoder.patch_embed1.proj.module.weight',)
  assert keys['params/encoder/block2_1/norm1/scale'] == (
      'encoder.block2.1.norm1.ln_0.weight', 'encoder.block2.1.norm1.ln_1.weight')
  assert keys['params/encoder/block1_0/attn/sr/bias'] == ('encoder.block1.0.attn.sr.module.bias',)
  assert keys['params/encoder/block4_0/mlp/dwconv/kernel'] == (
      'encoder.block4.0.mlp.dwconv.dwconv.weight',)
  assert keys['params/encoder/score_predictor_3/fc4/kernel'] == (
      'encoder.score_predictor.3.score_nets.0.7.weight',
      'encoder.score_predictor.3.score_nets.1.7.weight')
  assert keys['params/decoder/linear_fuse/bn/scale'] == ('decoder.linear_fuse.bn.weight',)
  assert keys['batch_stats/decoder/linear_fuse/bn/var'] == ('decoder.linear_fuse.bn.running_var',)
  assert keys['params/decoder/linear_c4/proj/kernel'] == ('decoder.linear_c4.proj.weight',)
  assert keys['params/alpha'] == ('alpha',)
  all_keys = [k for ks in keys.values() for k in ks]
  assert len(all_keys) == len(set(all_keys)) == 332  # + num_batches_tracked = official 333


def test_export_then_import_is_the_identity():
  variables = random_variables()
  exported = tokenfusion_io.export_tokenfusion(variables)
  assert exported['module.encoder.block1.0.attn.q.module.weight'].shape == (32, 32)
  assert exported['module.encoder.patch_embed1.proj.module.weight'].shape == (32, 3, 7, 7)
  assert exported['module.decoder.linear_fuse.bn.num_batches_tracked'].dtype == np.int64
  back = tokenfusion_io.import_tokenfusion(exported, b0_shapes())
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)


def test_import_rejects_unknown_missing_and_misshapen_keys():
  exported = tokenfusion_io.export_tokenfusion(random_variables())
  with pytest.raises(ValueError, match='not in the model'):
    tokenfusion_io.import_tokenfusion({**exported, 'module.extra': np.zeros(1)}, b0_shapes())
  missing = dict(exported)
  del missing['module.encoder.norm4.ln_1.bias']
  with pytest.raises(ValueError, match='lacks key'):
    tokenfusion_io.import_tokenfusion(missing, b0_shapes())
  wrong = {**exported, 'module.alpha': np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match='shape'):
    tokenfusion_io.import_tokenfusion(wrong, b0_shapes())


def test_imagenet_mit_initialises_every_branch_norm_alike_and_keeps_the_predictors():
  variables = random_variables(seed=1)
  source = tokenfusion_io.export_tokenfusion(random_variables(seed=2), prefix='')
  imagenet = {tokenfusion_io.imagenet_key(k): v for k, v in source.items()
              if tokenfusion_io.imagenet_key(k) and '.ln_1.' not in k}
  imagenet.update({'head.weight': np.zeros((1000, 256)), 'head.bias': np.zeros(1000)})
  assert 'block1.0.norm1.weight' in imagenet and 'block1.0.mlp.dwconv.dwconv.weight' in imagenet
  out = tokenfusion_io.import_mit_imagenet(imagenet, variables)
  enc = out['params']['encoder']
  np.testing.assert_array_equal(enc['block1_0']['norm1']['scale'][1],
                                source['encoder.block1.0.norm1.ln_0.weight'])
  np.testing.assert_array_equal(enc['block1_0']['attn']['q']['kernel'],
                                source['encoder.block1.0.attn.q.module.weight'].T)
  jax.tree_util.tree_map(np.testing.assert_array_equal, enc['score_predictor_0'],
                         variables['params']['encoder']['score_predictor_0'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, out['params']['decoder'],
                         variables['params']['decoder'])


def test_training_draws_stochastic_depth_and_dropout_and_keeps_frozen_bn_statistics():
  """The official recipe's training forward: drop path 0.1, Dropout2d 0.1, the head's BN
  frozen (FREEZE_BN): the output changes with the dropout key, the statistics do not."""
  model = TokenFusionSegmenter(7, 'mit_b0')
  x = jnp.asarray(np.random.RandomState(0).randn(2, 1, SMALL, SMALL, 3).astype(np.float32))

  variables = numpy_variables(model, x.shape)

  @jax.jit
  def train(variables, keys):  # one compilation: the two dropout keys vmapped
    return jax.vmap(lambda key: model.apply(variables, x, train=True, mutable=['batch_stats'],
                                            rngs={'dropout': key}))(keys)

  out, stats = train(variables, jax.random.split(jax.random.key(1)))
  logits = np.asarray(out['branches'])
  assert np.isfinite(logits).all()
  assert np.abs(logits[0] - logits[1]).max() > 1e-4
  for new, old in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(variables[
      'batch_stats'])):
    np.testing.assert_array_equal(new[0], old)
    np.testing.assert_array_equal(new[1], old)


def test_official_param_groups():
  groups = {path_str(p): tokenfusion_io.official_param_group(path_str(p))
            for p, _ in jax.tree_util.tree_flatten_with_path(b0_shapes()['params'])[0]}
  assert groups['encoder/block1_0/attn/q/kernel'] == 'encoder'
  assert groups['encoder/block1_0/attn/norm/scale'] == 'encoder_norm'
  assert groups['encoder/patch_embed2/norm/bias'] == 'encoder_norm'
  assert groups['encoder/norm4/scale'] == 'encoder_norm'
  assert groups['encoder/score_predictor_0/norm/scale'] == 'encoder'  # torch: '...0.weight'
  assert groups['decoder/linear_fuse/bn/scale'] == 'decoder'
  assert groups['alpha'] is None
