"""The Mix Transformer wired into the segmentation task (issue 28): config.model.backbone
'mit_b0'..'mit_b5' builds TokenFusion's segmenter with the official parameter counts, a fusion
that does not fit a backbone is refused in one line, and every MiT fusion point acts as defined
(docs/fusions.md), on tiny networks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import config as config_lib
from cen_jax.fusion import registry
from cen_jax.models import build_model, count_params
from cen_jax.tasks import segmentation

# The official WeTr(mit_bX, num_classes=40), M = 2, counted as the official compute_params.
OFFICIAL_WETR_PARAMS = {'mit_b0': 4_048_794, 'mit_b1': 14_961_914, 'mit_b2': 26_018_426,
                        'mit_b3': 45_917_306, 'mit_b4': 62_708_218, 'mit_b5': 83_331_962}


def mit_config(backbone='mit_b0', fusion='tokenfusion'):
  config = config_lib.base_config()
  config.model.backbone = backbone
  config.model.fusion = fusion
  return config


@pytest.mark.parametrize('backbone', sorted(OFFICIAL_WETR_PARAMS))
def test_backbone_builds_the_official_segmenter_with_its_parameter_count(backbone):
  """What `--mode summary` prints as params, from shapes only (jax.eval_shape)."""
  config = mit_config(backbone)
  variables, _ = segmentation.abstract_variables(config, build_model(config), 2)
  assert count_params(variables['params']) == OFFICIAL_WETR_PARAMS[backbone]


@pytest.mark.parametrize('fusion,backbone', [('average', 'mit_b0'), ('separate', 'mit_b1'),
                                             ('early', 'mit_b3'), ('tokenfusion', 'resnet')])
def test_a_fusion_that_does_not_fit_the_backbone_is_refused_in_one_line(fusion, backbone):
  with pytest.raises(ValueError) as info:
    build_model(mit_config(backbone, fusion))
  message = str(info.value)
  assert '\n' not in message
  assert f'config.model.fusion={fusion!r}' in message
  assert f'config.model.backbone={backbone!r}' in message


def test_fusions_that_fit_the_mit():
  fits = {n for n, f in registry.REGISTRY.items() if registry.fits_backbone(f, 'mit')}
  assert {'tokenfusion', 'cen', 'cen_no_l1', 'cen_l1_all', 'cen_l1_only', 'random_exchange',
          'asymfusion', 'none'} <= fits
  assert not fits & {'average', 'sum', 'separate', 'early'}
  with pytest.raises(ValueError, match="config.model.backbone='mit_b7': expected one of"):
    build_model(mit_config('mit_b7'))


def test_adamw_learning_rate_factor_is_the_official_poly_warmup_per_stage():
  """PolyWarmupAdamW before each step k of a stage: 1 - (1 - k / W)(1 - r) while k < W, then
  (1 - k / T) ** p, held from T on; k restarts with every stage (a new optimiser each)."""
  config = mit_config()
  t = config.train
  t.optimizer = 'adamw'
  t.stage_epochs = (20, 20)
  t.warmup_steps, t.warmup_ratio, t.poly_steps, t.poly_power = 4, 1e-6, 12, 0.5
  starts = segmentation.stage_starts(config, steps_per_epoch=1)

  def official(k):
    if k < 4:
      return 1 - (1 - k / 4) * (1 - 1e-6)
    return (1 - min(k, 11) / 12) ** 0.5

  factor = jax.jit(lambda step: segmentation.adamw_multiplier(config, starts, step))
  got = [float(factor(jnp.int32(step))) for step in range(40)]
  np.testing.assert_allclose(got, [official(step % 20) for step in range(40)], rtol=1e-6)


# ----------------------------------------------------------------------------- data parallel

def tiny_mit_config(fusion='tokenfusion'):
  """A tiny MiT (widths 8, 16, 20, 32, one block per stage, no spatial reduction) with the
  AdamW recipe, deterministic (no drop path, no dropout) so that devices draw nothing."""
  config = mit_config('mit_b0', fusion)
  m = config.model
  m.mit_embed_dims, m.mit_depths, m.mit_sr_ratios = (8, 16, 20, 32), (1, 1, 1, 1), (1, 1, 1, 1)
  m.embedding_dim, m.num_classes, m.dropout, m.drop_path_rate = 8, 5, 0.0, 0.0
  # The official FREEZE_BN. Trained, the head's BN cancels any constant shift of its input, so
  # the gradients of the biases before it are rounding noise, which Adam scales up to +-lr.
  m.frozen_bn = True
  t = config.train
  t.optimizer, t.batch_size, t.stage_epochs = 'adamw', 8, (1, 1)
  t.lr_enc, t.lr_dec, t.wd_enc, t.wd_dec = (1e-2, 5e-3), (1e-1, 5e-2), 0.01, 0.01
  t.warmup_steps, t.poly_steps = 1, 4
  t.l1_lambda, t.l1_per_output = 1e-2, False  # the token L1 weighs in the gradients
  return config


@functools.lru_cache(maxsize=None)
def single_device_run():
  """(config, batches, final state, scalars) of two steps on one device."""
  from tests.unit.test_train_step import random_batch, run_steps
  config = tiny_mit_config()
  batches = [random_batch(config, 8, seed=s) for s in range(2)]
  config.train.parallel = 'pmap'
  return (config, batches) + run_steps(config, jax.devices()[:1], batches)


@pytest.mark.parametrize('parallel', ['pmap', 'shard_map'])
def test_data_parallel_mit_step_equals_single_device(parallel):
  """TokenFusion with AdamW: the score L1 sums each device's examples (never divided per
  device), so 8 devices of one example each equal one device with all 8 over two steps."""
  from tests.unit.test_train_step import assert_trees_close, run_steps, total_losses
  assert jax.device_count() == 8
  config, batches, single, single_scalars = single_device_run()
  config = config.copy_and_resolve_references()
  config.train.parallel = parallel
  multi, multi_scalars = run_steps(config, jax.devices(), batches)
  np.testing.assert_allclose(total_losses(multi_scalars), total_losses(single_scalars), rtol=1e-5)
  for key in ('loss/l1', 'tokens_below_threshold/rgb', 'lr/decoder'):
    np.testing.assert_allclose(float(multi_scalars[-1][key]), float(single_scalars[-1][key]),
                               rtol=1e-5)
  assert float(single_scalars[0]['loss/l1']) > 0
  assert_trees_close(multi.params, single.params, rtol=1e-4, atol=1e-6)
  assert_trees_close(multi.opt_state, single.opt_state, rtol=1e-4, atol=1e-6)
  fresh = jax.tree.leaves(segmentation.init_variables(
      config, segmentation.build(config, axis_name=None), jax.random.key(0))['params'])
  assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(multi.params), fresh)) > 1e-3  # it trained


# ----------------------------------------------------------------------------- fusion points

def asym_by_hand(x):
  """AsymFusion at a stage end in numpy: branch m keeps its first S = 4 (C // 5) channels,
  takes the other's last C - S, and adds the other's first S shifted one pixel (group k of
  C // 5 channels towards (dy, dx) = (-1, 0), (0, -1), (0, 1), (1, 0): out[i, j] = in[i + dy,
  j + dx], zero outside)."""
  c = x.shape[-1]
  g, s = c // 5, 4 * (c // 5)
  out = np.concatenate([x[..., :s], x[::-1, ..., s:]], axis=-1)
  shifted = np.zeros_like(x)
  h, w = x.shape[-3:-1]
  padded = np.pad(x, [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)])
  for k, (dy, dx) in enumerate(((-1, 0), (0, -1), (0, 1), (1, 0))):
    shifted[..., k * g:(k + 1) * g] = padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w,
                                             k * g:(k + 1) * g]
  return out + shifted[::-1]


def cen_by_hand(x, scale, threshold):
  keep = np.abs(scale)[:, None, None, None, :] >= threshold
  return np.where(keep, x, x[::-1])


def tokens_by_hand(x, scores, threshold):
  scaled = x * scores[..., None]
  return np.where(scores[..., None] >= threshold, scaled, scaled[::-1])


def encoder_features(fusion, variables=None, seed=0):
  """(features of a tiny MiT encoder (widths 10, 20, 20, 40; 2 blocks in stage 1) on two 32x32
  images, its variables), applied eagerly so that point functions see concrete arrays."""
  from cen_jax.models import mit
  encoder = mit.mit('mit_b0', embed_dims=(10, 20, 20, 40), depths=(2, 1, 1, 1),
                    sr_ratios=(2, 1, 1, 1), fusion=fusion, threshold=0.5, drop_path_rate=0.0)
  x = jnp.asarray(np.random.RandomState(seed).randn(2, 1, 32, 32, 3).astype(np.float32))
  if variables is None:
    variables = encoder.init(jax.random.key(seed), x, train=False)
    variables = jax.tree_util.tree_map_with_path(randomise_norm_scales, variables)
  features, masks = encoder.apply(variables, x, train=False)
  return [np.asarray(f) for f in features], [np.asarray(m) for m in masks], variables


def randomise_norm_scales(path, leaf):
  """Private LayerNorm scales uniform in [0, 1) (some under the 0.5 threshold), branches apart."""
  name = '/'.join(str(getattr(k, 'key', k)) for k in path)
  if 'norm' in name and name.endswith('scale') and leaf.ndim == 2:
    return jnp.asarray(np.random.RandomState(len(name)).uniform(0, 1, leaf.shape), leaf.dtype)
  return leaf


@pytest.mark.parametrize('fusion,point,by_hand', [
    ('cen', 'norm2', lambda x, site: cen_by_hand(x, np.asarray(site.scale), site.threshold)),
    ('asymfusion', 'stage_end', lambda x, site: asym_by_hand(x)),
    ('tokenfusion', 'tokens',
     lambda x, site: tokens_by_hand(x, np.asarray(site.scores), site.threshold))])
def test_each_mit_point_acts_as_computed_by_hand(fusion, point, by_hand):
  """The registered fusion and a copy whose point function is the numpy computation above give
  the same encoder features (every stage, so the next stage and the decoder saw the fused
  tensor); the copy also records where it was called and what it read."""
  seen = []

  def probe(x, site):
    seen.append((site.block, site.point, None if site.scale is None else np.asarray(site.scale)))
    return jnp.asarray(by_hand(np.asarray(x), site))

  real = registry.get(fusion)
  registry.register('probe', points={point: probe}, where=real.where,
                    token_scores=real.token_scores)
  try:
    expected, expected_masks, variables = encoder_features('probe')
  finally:
    del registry.REGISTRY['probe']
  features, masks, _ = encoder_features(fusion, variables)
  none, _, _ = encoder_features('none', variables) if fusion != 'tokenfusion' else (None,) * 3
  for f, e in zip(features, expected):
    np.testing.assert_allclose(f, e, rtol=1e-5, atol=1e-5)
  for m, e in zip(masks, expected_masks):
    np.testing.assert_allclose(m, e, rtol=1e-5, atol=1e-6)
  seen = seen[len(seen) // 2:]  # init, then apply, each called every point once
  blocks = ['block1_0', 'block1_1', 'block2_0', 'block3_0', 'block4_0']
  stage_ends = ['norm1', 'norm2', 'norm3', 'norm4']
  assert [b for b, _, _ in seen] == (stage_ends if point == 'stage_end' else blocks)
  assert {p for _, p, _ in seen} == {point}
  encoder = variables['params']
  if point == 'norm2':  # the scale read is the block's own norm2 scale, some under 0.5
    for block, _, scale in seen:
      np.testing.assert_array_equal(scale, encoder[block]['norm2']['scale'])
    assert any((np.abs(scale) < 0.5).any() for _, _, scale in seen)
  if point == 'stage_end':
    for block, _, scale in seen:
      np.testing.assert_array_equal(scale, encoder[block]['scale'])
  if none is not None:  # the fusion did change the features
    assert max(np.abs(f - n).max() for f, n in zip(features, none)) > 1e-3
  if point == 'tokens':
    assert len(masks) == 5 and any((m < 0.5).any() for m in masks)
    assert any((m >= 0.5).any() for m in masks)


def test_sunrgbd_tokenfusion_config_is_the_nyudv2_recipe_on_sun_data():
  from cen_jax.configs import nyudv2_tokenfusion_mit, sunrgbd_cen_r101, sunrgbd_tokenfusion_mit
  got = sunrgbd_tokenfusion_mit.get_config('b2').to_dict()
  nyu = nyudv2_tokenfusion_mit.get_config('b2').to_dict()
  sun = sunrgbd_cen_r101.get_config().to_dict()
  assert got['model'] == dict(nyu['model'], num_classes=37)
  assert got['train'] == nyu['train']
  assert got['data'] == sun['data']  # every data key: name, depth stretch, crops, splits
  config = sunrgbd_tokenfusion_mit.get_config('b2')
  variables, _ = segmentation.abstract_variables(config, build_model(config), 2)
  # The 40-class head's last conv loses 3 output channels: 3 x (embedding_dim + 1) parameters.
  assert count_params(variables['params']) == \
      OFFICIAL_WETR_PARAMS['mit_b2'] - 3 * (config.model.embedding_dim + 1)
