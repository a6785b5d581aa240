"""The TPAMI scenarios as branch configurations (cen_jax/branches.py, cen_jax/tasks/dense.py):
branch graphs, M = 3 / 4 exchange and partition through the whole network, parameter growth,
the depth/normal targets and metrics, and the data-parallel dense step."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import branches as branches_lib
from cen_jax import config as config_lib
from cen_jax import input_pipeline, metrics, models, transforms
from cen_jax.fusion import ops
from cen_jax.tasks import dense_data
from cen_jax.tasks import dense
from cen_jax.configs import demo_dense
from cen_jax.datasets.synthetic_scenes import synthetic_scenes_dataset_builder as synth
from tests.helpers import data_fixtures
from tests.unit.test_train_step import assert_trees_close, run_steps, total_losses
from tests.helpers.tiny import tiny_config
from tests.helpers.env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_dense(branch_spec, fusion_name='cen'):
  config = config_lib.dense_config(branch_spec)
  tiny = tiny_config()
  for key, value in tiny.model.items():
    if not isinstance(value, type(tiny)):
      config.model[key] = value
  for key in ('batch_size', 'stage_epochs', 'lr_enc', 'lr_dec', 'l1_lambda'):
    config.train[key] = tiny.train[key]
  config.model.fusion = fusion_name
  return config


# ----------------------------------------------------------------------------- branch graphs

def test_branch_graph_of_every_scenario():
  graphs = {s: dense.branch_graph(demo_dense.get_config(s)) for s in demo_dense.SCENARIOS}
  fusion3 = graphs['fusion3']
  assert [(g['reads'], g['task'], g['loss']) for g in fusion3] == [
      ('rgb', 'semseg', 'cross_entropy'), ('depth', 'semseg', 'cross_entropy'),
      ('normals', 'semseg', 'cross_entropy')]
  assert fusion3[0]['exchanges_with'] == ['depth>semseg', 'normals>semseg']
  multitask = graphs['multitask']
  assert [(g['reads'], g['task'], g['loss']) for g in multitask] == [
      ('defocus', 'semseg', 'cross_entropy'), ('defocus', 'depth', 'l1'),
      ('defocus', 'normals', 'cosine')]
  assert multitask[1]['exchanges_with'] == ['defocus>semseg', 'defocus>normals']
  assert [(g['reads'], g['task']) for g in graphs['multitask_rgb']] == [
      ('rgb', 'semseg'), ('rgb', 'depth'), ('rgb', 'normals')]
  mm = graphs['mm_multitask']
  assert [(g['reads'], g['task']) for g in mm] == [
      ('rgb', 'semseg'), ('depth', 'semseg'), ('rgb', 'normals'), ('depth', 'normals')]
  assert all(len(g['exchanges_with']) == 3 for g in mm)
  # Without exchange (fusion none) no branch exchanges.
  none = demo_dense.get_config('mm_multitask')
  none.model.fusion = 'none'
  assert all(g['exchanges_with'] == [] for g in dense.branch_graph(none))
  # Outputs: every branch, plus an ensemble for each task with several branches.
  assert dense.output_names(demo_dense.get_config('mm_multitask')) == [
      'rgb>semseg', 'depth>semseg', 'ensemble>semseg', 'rgb>normals', 'depth>normals',
      'ensemble>normals']
  assert dense.output_names(demo_dense.get_config('multitask')) == [
      'defocus>semseg', 'defocus>depth', 'defocus>normals']
  assert dense.batch_keys(demo_dense.get_config('multitask')) == (
      'mask', 'target_depth', 'target_normals')


def test_cycle_and_parse():
  assert branches_lib.cycle(['a', 'b', 'c']) == ('a>b', 'b>c', 'c>a')
  cycle = branches_lib.graph(branches_lib.parse(branches_lib.cycle(['a', 'b', 'c'])),
                             exchanges=True)
  assert [(g['reads'], g['task']) for g in cycle] == [('a', 'b'), ('b', 'c'), ('c', 'a')]
  for bad, words in [('rgb', 'is not "input>task"'), ('rgb>', 'is not'),
                     (['a>b', 'a>b'], 'listed twice'), ([], 'is empty')]:
    with pytest.raises(ValueError, match=words):
      branches_lib.parse(bad)
  # Configs without config.branches: one branch per modality on the task's target.
  assert [b.name for b in branches_lib.of_config(config_lib.base_config())] == [
      'rgb>semseg', 'depth>semseg']
  assert branches_lib.inputs(config_lib.translation_config()) == ['reshading', 'edge_texture']


def test_bad_dense_configs_fail_in_one_line():
  config = tiny_dense(('rgb>semseg', 'rgb>albedo'))
  with pytest.raises(ValueError, match="task 'albedo'"):
    dense.check_config(config)
  config = tiny_dense(('rgb>semseg',))
  config.branches = ('hha>semseg',)
  with pytest.raises(ValueError, match="reads 'hha'"):
    dense.check_config(config)
  config = tiny_dense(('rgb>semseg', 'depth>semseg'), fusion_name='separate')
  with pytest.raises(ValueError, match='shared network'):
    dense.check_config(config)


# ----------------------------------------------------------------------------- M = 3, 4

def init_params(config, size=(16, 16)):
  model = dense.build(config, axis_name=None)
  variables = dense.init_variables(config, model, jax.random.key(0), image_size=size)
  return model, variables


@pytest.mark.parametrize('spec', [demo_dense.SCENARIOS['fusion3'],
                                  demo_dense.SCENARIOS['mm_multitask']])
def test_partition_covers_every_exchanging_norm(spec):
  """M = 3 and M = 4: every bn2 has one [M, C] scale; the M penalised parts are disjoint,
  contiguous and cover the channels, and the penalty is the hand sum over them."""
  config = tiny_dense(spec)
  _, variables = init_params(config)
  scales = models.exchange_scales(variables['params'])
  num_branches = len(spec)
  assert scales and all(s.shape[0] == num_branches for s in scales)
  total = 0.0
  for s in scales:
    masks = ops.sparsity_masks(*s.shape)
    assert (masks.sum(0) == 1).all()  # every channel penalised in exactly one branch
    for m in range(num_branches):
      cols = np.flatnonzero(masks[m])
      assert cols.size and (np.diff(cols) == 1).all()  # one contiguous part
    rng = np.random.RandomState(0)
    values = rng.randn(*s.shape)
    hand = sum(np.abs(values[m, masks[m]]).sum() for m in range(num_branches))
    np.testing.assert_allclose(float(ops.l1_penalty([jnp.asarray(values)])), hand, rtol=1e-6)
    total += float(np.abs(np.asarray(s))[masks].sum())
  np.testing.assert_allclose(float(ops.l1_penalty(scales)), total, rtol=1e-5)


def zero_partition_scales(params, branch: int):
  """Sets branch `branch`'s penalised bn2 scales to 0 (under any threshold) everywhere."""
  def edit(path, leaf):
    if models.EXCHANGE_SCALE_PATH.match(models.path_str(path)):
      masks = ops.sparsity_masks(*leaf.shape)
      leaf = jnp.where(jnp.asarray(masks[branch])[None] &
                       (jnp.arange(leaf.shape[0]) == branch)[:, None], 0.0, leaf)
    return leaf
  return jax.tree_util.tree_map_with_path(edit, params)


@pytest.mark.parametrize('spec', [demo_dense.SCENARIOS['fusion3'],
                                  demo_dense.SCENARIOS['mm_multitask']])
def test_exchange_flows_between_all_branches(spec):
  """With no scale under the threshold CEN equals no fusion; once branch 0's penalised scales
  are zero its output depends on every other branch's input (their mean replaces its
  channels), and only through the exchange."""
  config = tiny_dense(spec)
  model, variables = init_params(config)
  none_model = dense.build(tiny_dense(spec, 'none'), axis_name=None)
  num_branches = len(spec)
  x = jax.random.normal(jax.random.key(1), (num_branches, 2, 16, 16, 3))

  def first_branch(model_, params, inputs):
    out = model_.apply({'params': params, 'batch_stats': variables['batch_stats']}, inputs,
                       train=False)['tasks']
    return np.asarray(out[spec[0].split('>')[1]]['branches'][0])

  params = variables['params']
  # Every scale away from zero: nothing is exchanged.
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.where(jnp.abs(leaf) < 0.6, 0.6, leaf)
      if models.EXCHANGE_SCALE_PATH.match(models.path_str(path)) else leaf, params)
  np.testing.assert_allclose(first_branch(model, params, x), first_branch(none_model, params, x),
                             rtol=1e-5, atol=1e-6)
  exchanged = zero_partition_scales(params, 0)
  base = first_branch(model, exchanged, x)
  for other in range(1, num_branches):
    x_other = x.at[other].multiply(-2.0)
    assert np.abs(first_branch(model, exchanged, x_other) - base).max() > 1e-4, other
    # Without exchange branch 0 never sees branch `other`.
    np.testing.assert_allclose(first_branch(none_model, exchanged, x_other),
                               first_branch(none_model, exchanged, x), rtol=1e-6, atol=1e-7)


def norm_params_per_branch(params) -> int:
  """Parameters of the private norms of one branch (leaves under a BatchNorm with a leading
  branch axis)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  count = 0
  for path, leaf in flat:
    name = models.path_str(path)
    if name.startswith('encoder/') and name.endswith(('/scale', '/bias')) and \
        'bn' in name.split('/')[-2]:
      count += int(np.prod(leaf.shape[1:]))
  return count


def test_parameters_grow_only_by_private_norms_and_heads():
  counts, norms = {}, {}
  for num in (2, 3, 4):
    spec = ['rgb>semseg', 'depth>semseg', 'normals>semseg', 'hha>semseg'][:num]
    _, variables = init_params(tiny_dense(spec))
    counts[num] = models.count_params(variables['params'])
    norms[num] = norm_params_per_branch(variables['params'])
  assert norms[2] == norms[3] == norms[4] > 0
  # One more modality: its private norms and its ensemble weight, nothing else.
  assert counts[3] - counts[2] == counts[4] - counts[3] == norms[2] + 1
  # One more task: its own classifier (3x3 conv with bias) and no new convolution elsewhere.
  _, one = init_params(tiny_dense(['rgb>semseg']))
  _, two = init_params(tiny_dense(['rgb>semseg', 'rgb>normals']))
  width = tiny_config().model.decoder_widths[1]
  head = 3 * 3 * width * 3 + 3 + 1  # normals head weights + bias, alpha_normals
  assert models.count_params(two['params']) - models.count_params(one['params']) == \
      norms[2] + head


# ----------------------------------------------------------------------------- targets

def test_camera_normals_of_planes_by_hand():
  height, width, focal = 9, 11, 20.0
  v, u = np.mgrid[0:height, 0:width].astype(np.float64)
  u -= (width - 1) / 2
  v -= (height - 1) / 2
  # Fronto-parallel wall: the normal faces the camera.
  n = synth.camera_normals(np.full((height, width), 3.0), focal)
  np.testing.assert_allclose(n, np.broadcast_to([0, 0, -1.0], n.shape), atol=1e-12)
  # The plane z = 2 + 0.5 X (X the camera x): depth z = 2 / (1 - 0.5 u / f); normal
  # proportional to (0.5, 0, -1).
  depth = 2.0 / (1.0 - 0.5 * u / focal)
  n = synth.camera_normals(depth, focal)
  expected = np.array([0.5, 0.0, -1.0]) / np.sqrt(1.25)
  np.testing.assert_allclose(n[:, 1:-1], np.broadcast_to(expected, n[:, 1:-1].shape),
                             atol=2e-3)


def test_normals_code_and_mirror():
  normals = np.array([[[0.0, 0.0, -1.0], [0.6, -0.8, 0.0]]])
  code = synth.encode_normals(normals, np.array([[True, False]]))
  assert code[0, 0].tolist() == [128, 128, 1] and code[0, 1].tolist() == [0, 0, 0]
  np.testing.assert_allclose(dense_data.decode_normals(code)[0, 0], [0, 0, -1], atol=1e-6)
  assert dense_data.decode_normals(code)[0, 1].tolist() == [0, 0, 0]
  # A mirrored example negates the x of its normals (and keeps the rest).
  example = {'rgb': np.zeros((4, 6, 3), np.uint8), 'mask': np.zeros((4, 6), np.uint8),
             'target_normals': np.tile(np.float32([0.6, 0.0, -0.8]), (4, 6, 1)),
             'target_depth': np.ones((4, 6), np.float32)}
  for seed in range(8):
    out = transforms.augment(dict(example), align='crop', crop_size=4, shorter_side=4,
                                 low_scale=1.0, high_scale=1.0, ignore_label=255,
                                 rng=np.random.default_rng(seed),
                                 mirror_negate=('target_normals',))
    mirrored = np.random.default_rng(seed)
    mirrored.uniform()
    flip = bool(mirrored.integers(2))
    assert out['target_normals'][0, 0, 0] == pytest.approx(-0.6 if flip else 0.6)
    assert out['target_depth'].shape == out['mask'].shape


def test_scene_normals_are_stored_and_do_not_change_the_other_features():
  ex = synth.example('train', 3, 24, 24)
  normals = dense_data.decode_normals(ex['normals'])
  valid = np.any(normals != 0, axis=-1)
  assert 0.5 < valid.mean() < 1.0  # boundaries have none
  np.testing.assert_allclose(np.linalg.norm(normals[valid], axis=-1), 1.0, atol=1e-6)
  assert (normals[valid][:, 2] < 0).all()  # facing the camera


# ----------------------------------------------------------------------------- metrics

def test_depth_metrics_by_hand():
  pred = jnp.array([[1.0, 2.0, 4.0, 9.0]])
  target = jnp.array([[1.0, 2.5, 3.0, 0.0]])  # the last pixel has no target
  sums = metrics.depth_sums(pred, target, target > 0)
  s = metrics.depth_scores(np.asarray(sums))
  assert s['rmse'] == pytest.approx(np.sqrt((0 + 0.25 + 1.0) / 3))
  assert s['mae'] == pytest.approx(1.5 / 3)
  assert s['abs_rel'] == pytest.approx((0 + 0.5 / 2.5 + 1 / 3) / 3)
  # Only the exact pixel: 2.5 / 2 = 1.25 is not < 1.25, nor is 4 / 3.
  assert s['delta1'] == pytest.approx(100 / 3)


def test_normal_metrics_by_hand():
  angles = np.array([0.0, 10.0, 20.0, 40.0, 90.0])
  rad = np.radians(angles)
  target = jnp.tile(jnp.array([0.0, 0.0, 1.0]), (5, 1))
  pred = jnp.stack([jnp.sin(rad), jnp.zeros(5), jnp.cos(rad)], axis=-1) * 3.0  # not unit
  sums = metrics.normal_sums(pred, target, jnp.ones(5, bool))
  s = metrics.normal_scores(jax.tree.map(np.asarray, sums))
  assert s['mean'] == pytest.approx(angles.mean(), abs=1e-3)
  assert s['median'] == pytest.approx(20.0, abs=0.05)
  assert s['within_11.25'] == pytest.approx(40.0)
  assert s['within_22.5'] == pytest.approx(60.0)
  assert s['within_30'] == pytest.approx(60.0)


# ----------------------------------------------------------------------------- steps

def random_dense_batch(config, batch, size=(20, 24), seed=0):
  rng = np.random.RandomState(seed)
  out = {name: rng.randn(batch, *size, 3).astype(np.float32) for name in config.modalities}
  mask = rng.randint(0, config.model.num_classes, (batch,) + size)
  mask[0] = config.data.ignore_label  # uneven counts across devices
  out['mask'] = mask.astype(np.int32)
  depth = rng.uniform(0.5, 4.0, (batch,) + size).astype(np.float32)
  depth[1, :5] = 0.0
  out['target_depth'] = depth
  normals = rng.randn(batch, *size, 3).astype(np.float32)
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  normals[2, :, :7] = 0.0
  out['target_normals'] = normals
  return out


@pytest.mark.parametrize('parallel', ['pmap', 'shard_map'])
def test_data_parallel_dense_step_equals_single_device(parallel):
  assert jax.device_count() == 8
  config = tiny_dense(demo_dense.SCENARIOS['mm_multitask'] + ('rgb>depth',))
  batches = [random_dense_batch(config, 8, seed=s) for s in range(2)]
  config.train.parallel = 'pmap'
  single, single_scalars = run_steps(config, jax.devices()[:1], batches)
  config.train.parallel = parallel
  multi, multi_scalars = run_steps(config, jax.devices(), batches)
  np.testing.assert_allclose(total_losses(multi_scalars), total_losses(single_scalars),
                             rtol=1e-5)
  for name in dense.output_names(config):
    np.testing.assert_allclose(multi_scalars[-1][f'loss/{name}'],
                               single_scalars[-1][f'loss/{name}'], rtol=1e-5)
  assert_trees_close(multi.params, single.params)
  assert_trees_close(multi.batch_stats, single.batch_stats)


def test_dense_losses_by_hand():
  """The depth and normal losses of a fixed prediction, against numpy."""
  rng = np.random.RandomState(0)
  pred = jnp.asarray(rng.randn(2, 1, 4, 4, 3).astype(np.float32))
  target = rng.randn(1, 4, 4, 3).astype(np.float32)
  target /= np.linalg.norm(target, axis=-1, keepdims=True)
  target[0, 0] = 0.0
  config = tiny_dense(('rgb>normals',))
  valid = dense.target_valid('normals', jnp.asarray(target), config)
  sums = dense.loss_sums('normals', pred, jnp.asarray(target), valid, config)
  p = np.asarray(pred)
  unit = p / np.linalg.norm(p, axis=-1, keepdims=True)
  hand = [(1 - (unit[o] * target).sum(-1))[np.asarray(valid)].sum() for o in range(2)]
  np.testing.assert_allclose(np.asarray(sums), hand, rtol=1e-5)
  depth_target = np.abs(rng.randn(1, 4, 4)).astype(np.float32)
  depth_target[0, 1] = 0.0
  valid = dense.target_valid('depth', jnp.asarray(depth_target), config)
  sums = dense.loss_sums('depth', pred[..., :1], jnp.asarray(depth_target), valid, config)
  hand = [np.abs(p[o, ..., 0] - depth_target)[depth_target > 0].sum() for o in range(2)]
  np.testing.assert_allclose(np.asarray(sums), hand, rtol=1e-5)


def test_multitask_demo_reads_the_stored_defocus_image(tmp_path):
  """The multitask demo's one input is the scenes' stored defocus image, normalised as rgb,
  beside the depth and normals targets of the same example."""
  config = demo_dense.get_config('multitask')
  config.data.builder_config = 'tiny'
  config.data.data_dir = str(tmp_path / 'tfds')
  input_pipeline.prepare(config)
  raw = input_pipeline._Source(input_pipeline.prepared_dir(config), 'test')[1]
  example = dense_data.EvalSample(config)(raw)
  assert set(example) == {'defocus', 'mask', 'target_depth', 'target_normals'}
  stored = synth.example('test', 1, 16, 20)['defocus']
  np.testing.assert_array_equal(np.asarray(raw['defocus']), stored)
  mean, std = np.asarray(config.data.rgb_mean), np.asarray(config.data.rgb_std)
  np.testing.assert_allclose(example['defocus'], (stored / 255.0 - mean) / std, atol=1e-5)


def test_dense_demo_trains_and_evaluates_through_main(tmp_path):
  """A few steps of the multimodal multitask demo through main.py on the tiny scenes."""
  workdir = tmp_path / 'wd'
  overrides = ['--config.data.builder_config=tiny', f'--config.data.data_dir={tmp_path}/tfds',
               '--config.data.crop_size=16', '--config.data.shorter_side=16',
               '--config.data.eval_batch_size=3', '--config.train.batch_size=4',
               '--config.train.max_steps=4', '--config.train.eval_every_epochs=1']
  env = child_env()
  run = subprocess.run([sys.executable, 'main.py', '--config=configs/demo_dense.py:mm_multitask',
                        f'--workdir={workdir}', *overrides], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-2000:]
  import json
  results = json.loads((workdir / 'eval_results.json').read_text())
  assert results['step'] == 4
  assert set(results['metrics']) == {'rgb>semseg', 'depth>semseg', 'ensemble>semseg',
                                     'rgb>normals', 'depth>normals', 'ensemble>normals'}
  assert results['main_score'] == results['metrics']['ensemble>semseg']['miou']
  assert 0 <= results['metrics']['ensemble>normals']['within_30'] <= 100
  assert list((workdir / 'previews').glob('*.png'))


def test_nyudv2_multitask_normals_from_user_files(tmp_path):
  """builder_config 'multitask' reads <manual_dir>/normals/<stem>.png beside the official
  layout; the dense pipeline decodes them (crop-aligned to the mask) and names a missing file."""
  from tests.helpers import data_fixtures as fx
  arrays, _ = fx.write_manual_dir(tmp_path / 'manual', num_train=2, num_test=1,
                                  input_hw=(18, 22))
  rng = np.random.default_rng(0)
  codes = {}
  for rel, (rgb, _, _) in arrays.items():
    n = rng.normal(size=rgb.shape[:2] + (3,))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    codes[rel] = synth.encode_normals(n, rng.random(rgb.shape[:2]) > 0.2)
    fx.save_png(os.path.join(tmp_path, 'manual', 'normals', os.path.basename(rel)), codes[rel])
  config = config_lib.dense_config(('rgb>semseg', 'rgb>normals', 'depth>depth'))
  config.data.name = 'nyudv2'
  config.data.builder_config = 'multitask'
  config.data.data_dir = str(tmp_path / 'tfds')
  config.data.manual_dir = str(tmp_path / 'manual')
  batch = next(iter(data_fixtures.eval_iterator(config, 'test', batch_size=1)))
  rgb, depth, mask = arrays['rgb/000003.png']
  top, left = (18 - 16) // 2, (22 - 20) // 2  # official CropAlignToMask of 18x22 to 16x20
  code = codes['rgb/000003.png'][top:top + 16, left:left + 20]
  np.testing.assert_allclose(batch['target_normals'][0], dense_data.decode_normals(code))
  np.testing.assert_allclose(batch['target_depth'][0],
                             depth[top:top + 16, left:left + 20] / 5000.0, rtol=1e-6)
  assert batch['target_normals'].shape == (1, 16, 20, 3)
  # A missing normals file fails the prepare in one line naming it.
  os.remove(os.path.join(tmp_path, 'manual', 'normals', '000001.png'))
  config.data.data_dir = str(tmp_path / 'tfds2')
  with pytest.raises(ValueError, match=r'normals/000001\.png: file not found'):
    input_pipeline.prepare(config)


def test_empty_stats_match_the_eval_step():
  """A process without eval batches contributes zeros of exactly the eval step's structure."""
  config = tiny_dense(demo_dense.SCENARIOS['mm_multitask'] + ('rgb>depth',))
  model, variables = init_params(config)
  batch = random_dense_batch(config, 3, size=(16, 16))
  batch['x'] = np.stack([batch[n] for n in branches_lib.inputs(config)])
  stats, _ = dense.eval_step(variables, batch, model=model, config=config)
  empty = dense.empty_stats(config)
  assert jax.tree.structure(empty) == jax.tree.structure(stats)
  for a, b in zip(jax.tree.leaves(empty), jax.tree.leaves(stats)):
    assert a.shape == b.shape and not a.any()
  assert dense.scores('normals', jax.tree.map(lambda s: s[0], empty['normals']))['mean'] == 0.0
