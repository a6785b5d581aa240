"""The fusion registry (cen_jax/fusion/registry.py): every registered fusion against an independent
truth (hand-built masks, single-branch networks with sliced parameters, hand sums), and a fusion
registered from outside the package trained through main.py."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax.fusion import ops
from cen_jax.fusion import registry
from cen_jax.models import build_model, count_params, exchange_scales
from cen_jax.models.resnet import ResNetEncoder
from tests.unit.test_models import fill_variables, rand_images, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def variables_for(model, x, seed=0):
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return fill_variables(shapes, seed=seed)


def site(scale=None, **options):
  return registry.Site('layer1_0', 0, 0, 1, 0.5, options, scale=scale)


def test_registry_names_and_errors():
  assert {'cen', 'asymfusion', 'none', 'cen_no_l1', 'cen_l1_all', 'cen_l1_only',
          'random_exchange', 'average', 'sum', 'separate', 'early'} <= set(registry.REGISTRY)
  with pytest.raises(ValueError, match=r"unknown points \['bn4'\]"):
    registry.register('bad', points={'bn4': lambda x, s: x})
  with pytest.raises(ValueError, match="a 'separate' network has no fusion points"):
    registry.register('bad', points={'bn2': lambda x, s: x}, network='separate')
  with pytest.raises(ValueError, match="config.model.fusion='nope': expected one of"):
    registry.get('nope')
  assert 'bad' not in registry.REGISTRY


def test_point_functions_chain_their_carry():
  seen = {}

  def first(x, s):
    return x + 1, {'a': 2.0}

  def second(x, s):
    seen.update(s.carry)
    return x * s.carry['a']

  f = registry.Fusion('t', {'act1': first, 'act2': second})
  x, carry = registry.apply_point(f, 'act1', jnp.ones(3), site(), {})
  x, carry = registry.apply_point(f, 'bn2', x, site(), carry)  # no function there: unchanged
  x, _ = registry.apply_point(f, 'act2', x, site(), carry)
  np.testing.assert_array_equal(x, [4.0, 4.0, 4.0])
  assert seen == {'a': 2.0}


def test_random_exchange_mask_is_fixed_disjoint_and_in_the_partition():
  mask = registry.random_exchange_mask('layer2_1', 2, 400, 0.5, seed=0)
  np.testing.assert_array_equal(mask, registry.random_exchange_mask('layer2_1', 2, 400, 0.5, 0))
  assert not np.array_equal(mask, registry.random_exchange_mask('layer2_2', 2, 400, 0.5, 0))
  assert not (mask & ~ops.sparsity_masks(2, 400)).any()  # only partitioned channels
  assert not (mask[0] & mask[1]).any()
  assert 0.4 < mask[0, :200].mean() < 0.6 and 0.4 < mask[1, 200:].mean() < 0.6
  assert not registry.random_exchange_mask('x', 3, 30, 0.0, 0).any()


def test_random_exchange_swaps_exactly_the_masked_channels():
  x = jax.random.normal(jax.random.key(0), (2, 1, 3, 3, 40))
  s = registry.Site('layer3_0', 2, 0, 2, 0.5, {'random_fraction': 0.3, 'random_seed': 7})
  out = np.asarray(registry.random_exchange(x, s))
  mask = registry.random_exchange_mask('layer3_0', 2, 40, 0.3, 7)
  expected = np.where(mask[:, None, None, None, :], np.asarray(x)[::-1], np.asarray(x))
  np.testing.assert_array_equal(out, expected)


def test_penalties_by_hand():
  scales = [jnp.array([[1.0, -2.0, 3.0, 4.0], [-5.0, 6.0, 7.0, -8.0]])]
  assert float(registry.partitioned_l1(scales)) == 1 + 2 + 7 + 8
  assert float(registry.all_channels_l1(scales)) == 36.0
  assert float(registry.penalty(registry.get('none'), scales, {})) == 0.0


def test_cen_l1_only_computes_none_and_penalises_as_cen():
  """With scales under the threshold, `cen` exchanges and `cen_l1_only` does not: its outputs
  are those of `none`, and its penalty is `cen`'s partitioned L1."""
  x = rand_images(2, seed=9)
  models = {name: build_model(tiny_config(name)) for name in ('none', 'cen', 'cen_l1_only')}
  variables = variables_for(models['cen'], x, seed=10)

  def some_under_threshold(path, leaf):
    if path[-1].key == 'scale' and 'bn2' in str(path):
      return leaf.at[:, 0].set(0.0)
    return leaf

  variables = jax.tree_util.tree_map_with_path(some_under_threshold,
                                               jax.tree.map(jnp.asarray, variables))
  outs = {name: m.apply(variables, x, train=False) for name, m in models.items()}
  np.testing.assert_array_equal(outs['cen_l1_only']['branches'], outs['none']['branches'])
  assert not np.allclose(outs['cen']['branches'], outs['none']['branches'])
  scales = exchange_scales(variables['params'])
  penalty = float(registry.penalty(registry.get('cen_l1_only'), scales, {}))
  assert penalty > 0 and penalty == float(registry.penalty(registry.get('cen'), scales, {}))


@pytest.mark.parametrize('name, combine', [('average', np.mean), ('sum', np.sum)])
def test_stage_end_fusions_make_branches_agree_after_each_stage(name, combine):
  """After the last block of every stage both branches carry combine(branches) of that
  block's unfused output, so every stage output is identical across branches."""
  x = rand_images(2, seed=3)
  enc = ResNetEncoder((1, 2, 1, 1), dict(use_running_average=True), 8, (4, 8, 8, 8), name)
  plain = ResNetEncoder((1, 2, 1, 1), dict(use_running_average=True), 8, (4, 8, 8, 8), 'none')
  variables = fill_variables(jax.eval_shape(lambda x: enc.init(jax.random.key(0), x), x), 4)
  outs = enc.apply(variables, x)
  for out in outs:
    np.testing.assert_array_equal(out[0], out[1])
  # Stage 1 alone: the fused output equals combine() of the unfused network's stage 1.
  unfused = plain.apply(variables, x)[0]
  np.testing.assert_allclose(outs[0][0], combine(np.asarray(unfused), axis=0), rtol=1e-6,
                             atol=1e-6)


def test_separate_network_is_one_single_branch_network_per_branch():
  config = tiny_config('separate')
  model = build_model(config)
  x = rand_images(2, seed=5)
  variables = variables_for(model, x, seed=6)
  out = model.apply(variables, x, train=False)
  single = build_model(tiny_config('none', modalities=('rgb',)))
  for m in range(2):
    branch = variables['params'][f'branch{m}']
    stats = variables['batch_stats'][f'branch{m}']
    ref = single.apply({'params': branch, 'batch_stats': stats}, x[m:m + 1], train=False)
    np.testing.assert_allclose(out['branches'][m], ref['branches'][0], rtol=1e-5, atol=1e-6)
  weights = jax.nn.softmax(variables['params']['alpha'])
  np.testing.assert_allclose(out['ensemble'], np.tensordot(weights, out['branches'], 1),
                             rtol=1e-5, atol=1e-6)
  assert count_params(variables['params']) == 2 * count_params(
      variables_for(single, x[:1])['params']) + 2  # plus the outer alpha
  from cen_jax.models import is_encoder
  assert is_encoder('branch1/encoder/layer1_0/conv1/kernel')
  assert not is_encoder('branch1/clf_conv/kernel') and not is_encoder('alpha')
  assert exchange_scales(variables['params']) == []  # no penalty, nothing exchanged


def test_early_fusion_is_one_branch_on_concatenated_inputs():
  model = build_model(tiny_config('early'))
  x = rand_images(2, seed=7)
  variables = variables_for(model, x, seed=8)
  assert variables['params']['encoder']['conv1']['kernel'].shape[2] == 6
  out = model.apply(variables, x, train=False)
  assert out['branches'].shape[0] == 1
  single = build_model(tiny_config('none', modalities=('rgb',)))
  ref = single.apply(variables, jnp.concatenate([x[0], x[1]], axis=-1)[None], train=False)
  np.testing.assert_array_equal(out['branches'], ref['branches'])
  np.testing.assert_array_equal(out['ensemble'], out['branches'][0])


def test_translation_takes_only_norm_point_fusions():
  from cen_jax import models
  from tests.helpers.tiny import tiny_translation_config
  for name in ('average', 'separate', 'early'):
    config = tiny_translation_config()
    config.model.fusion = name
    with pytest.raises(ValueError, match="translation needs a fusion of the shared network"):
      models.build_translation_models(config)


def hand_asymfusion(x: np.ndarray) -> np.ndarray:
  """AsymFusion's one-step form written out in numpy for 2 branches [2, N, H, W, C]: branch m
  keeps its first S = 4 (C // 5) channels and takes the other's last C - S, plus the other
  branch's channel group k moved one pixel along SHIFT_DIRECTIONS[k] (zero filled)."""
  channels = x.shape[-1]
  group, split = channels // 5, 4 * (channels // 5)
  shuffled = np.concatenate([x[..., :split], x[::-1, ..., split:]], axis=-1)
  shifted = np.zeros_like(x)
  height, width = x.shape[2], x.shape[3]
  for k, (dy, dx) in enumerate(ops.SHIFT_DIRECTIONS):
    for i in range(height):
      for j in range(width):
        if 0 <= i + dy < height and 0 <= j + dx < width:
          shifted[:, :, i, j, k * group:(k + 1) * group] = x[:, :, i + dy, j + dx,
                                                             k * group:(k + 1) * group]
  return shuffled + shifted[::-1]


@pytest.mark.parametrize('num_downs, levels', [(5, ['conv2', 'conv3', 'conv4']),
                                               (7, ['conv2', 'conv3', 'conv4', 'conv5'])])
def test_asymfusion_in_the_unet_acts_after_the_encoder_norms_of_stride_4_to_32(num_downs,
                                                                                levels):
  """The placement by hand: a probe with asymfusion's own blocks and point function records
  where it is called in a tiny pix2pix generator, and what it returns there."""
  from cen_jax.models.pix2pix import Generator
  asym = registry.get('asymfusion')
  seen = {}

  def probe(x, site):
    out = asym.points['norm'](x, site)
    seen[site.block] = (np.asarray(x), np.asarray(out))
    return out

  registry.register('asym_probe', points={'norm': probe}, where=asym.where, max_branches=2)
  try:
    size = 2 ** num_downs
    x = jax.random.normal(jax.random.key(0), (2, 1, size, size, 3))
    model = Generator(ngf=5, num_downs=num_downs, fusion='asym_probe')
    model.init({'params': jax.random.key(1), 'dropout': jax.random.key(2)}, x, train=False,
               deterministic=True)
  finally:
    del registry.REGISTRY['asym_probe']
  assert sorted(seen) == levels  # normed levels are conv2..conv{num_downs - 1}
  for block, (before, after) in seen.items():
    np.testing.assert_allclose(after, hand_asymfusion(before), rtol=1e-6, atol=1e-6,
                               err_msg=block)
  # Translation accepts it (2 branches) and builds it.
  from cen_jax import models
  from tests.helpers.tiny import tiny_translation_config
  config = tiny_translation_config()
  config.model.fusion = 'asymfusion'
  generator, _ = models.build_translation_models(config)
  assert generator.fusion == 'asymfusion'


def test_user_fusion_module_registers_and_trains_through_main(tmp_path):
  """examples/soft_exchange.py (outside the package), named by config, trains for a few steps
  through main.py: the penalty it declares is applied and its scales are monitored."""
  from tests.e2e.test_end_to_end import run_main
  workdir = str(tmp_path / 'run')
  config = os.path.join(ROOT, 'tests', 'helpers', 'configs', 'tiny_synthetic.py')
  run_main(f'--config={config}', f'--workdir={workdir}',
           f'--config.model.fusion_module={os.path.join(ROOT, "examples", "soft_exchange.py")}',
           '--config.model.fusion=soft_exchange', '--config.train.stage_epochs=(1,1)',
           data_dir=str(tmp_path / 'tfds'))
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_lines = [l for l in lines if 'loss/l1' in l]
  assert [l['step'] for l in train_lines] == [1, 2, 3, 4]
  assert all(l['loss/l1'] > 0 for l in train_lines)
  assert 'scales_below_threshold/rgb' in train_lines[0]
  with open(os.path.join(workdir, 'eval_results.json')) as f:
    results = json.load(f)
  assert set(results['metrics']) == {'rgb', 'depth', 'ensemble'}
  bad = run_main(f'--config={config}', f'--workdir={workdir}',
                 '--config.model.fusion=soft_exchange', data_dir=str(tmp_path / 'tfds'),
                 check=False)
  assert bad.returncode != 0
  assert "config.model.fusion='soft_exchange': expected one of" in bad.stderr
