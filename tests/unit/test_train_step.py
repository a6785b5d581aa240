"""Data-parallel train steps equal one single-device step on the global batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import runtime, train
from cen_jax.tasks import segmentation
from tests.helpers.tiny import tiny_config


def random_batch(config, batch, size=(20, 24), seed=0):
  rng = np.random.RandomState(seed)
  out = {name: rng.randn(batch, *size, 3).astype(np.float32) for name in config.modalities}
  mask = rng.randint(0, config.model.num_classes, (batch,) + size)
  mask[rng.rand(*mask.shape) < 0.2] = config.data.ignore_label
  # Uneven labelled-pixel counts across devices: the loss must still be the global mean.
  mask[0] = config.data.ignore_label
  out['mask'] = mask.astype(np.int32)
  return out


def run_steps(config, devices, batches, compile_first=False):
  """(final state, [host scalars of each step]) of the configured task's runner; compile_first:
  its step compiled from the state's shapes before the state exists, as main.py does."""
  model = train.build(config)
  starts = train.stage_starts(config, steps_per_epoch=2)
  runner = train.Runner(config, model, starts, devices=devices)
  if compile_first:
    runner.compile(train.template_state(config, model), batches[0])
  state = runner.place_state(train.create_state(config, model, jax.random.key(0)))
  scalars = []
  for batch in batches:
    state, step_scalars = runner.step(state, batch)
    scalars.append(jax.device_get(step_scalars))
  return jax.device_get(state), scalars


def total_losses(scalars):
  return [float(s['loss/total']) for s in scalars]


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize('parallel', ['pmap', 'shard_map'])
def test_data_parallel_step_equals_single_device(parallel):
  assert jax.device_count() == 8
  config = tiny_config()
  batches = [random_batch(config, 8, seed=s) for s in range(2)]
  config.train.parallel = 'pmap'
  single, single_scalars = run_steps(config, jax.devices()[:1], batches)
  config.train.parallel = parallel
  multi, multi_scalars = run_steps(config, jax.devices(), batches)
  np.testing.assert_allclose(total_losses(multi_scalars), total_losses(single_scalars), rtol=1e-5)
  assert int(multi.step) == int(single.step) == 2
  assert_trees_close(multi.params, single.params)
  assert_trees_close(multi.batch_stats, single.batch_stats)
  assert_trees_close(multi.opt_state, single.opt_state)
  # The step did train: parameters and BN statistics moved.
  fresh = train.create_state(config, train.build(config), jax.random.key(0))
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       multi.batch_stats, fresh.batch_stats)
  assert max(jax.tree.leaves(moved)) > 1e-3


@pytest.mark.parametrize('parallel', ['pmap', 'shard_map'])
def test_a_step_compiled_before_the_state_exists_is_the_same_step(parallel):
  config = tiny_config()
  config.train.parallel = parallel
  batches = [random_batch(config, 4, seed=s) for s in range(2)]
  lazy, lazy_scalars = run_steps(config, jax.devices()[:2], batches)
  first, first_scalars = run_steps(config, jax.devices()[:2], batches, compile_first=True)
  assert total_losses(first_scalars) == total_losses(lazy_scalars)
  assert_trees_close(first, lazy, rtol=0, atol=0)


def test_frozen_bn_keeps_statistics():
  config = tiny_config(frozen_bn=True)
  state, _ = run_steps(config, jax.devices()[:2], [random_batch(config, 8)])
  fresh = train.create_state(config, train.build(config), jax.random.key(0))
  assert_trees_close(state.batch_stats, fresh.batch_stats, rtol=0, atol=0)


def test_loss_matches_hand_computation():
  """Total loss = sum over outputs of the mean CE over labelled pixels + (M+1) * lambda * L1."""
  config = tiny_config()
  batch = random_batch(config, 2)
  model = train.build(config)
  state = train.create_state(config, model, jax.random.key(0))
  x = np.stack([batch[n] for n in config.modalities])
  outputs = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x,
                        train=False)
  logits = np.asarray(segmentation.stacked_logits(outputs))
  up = np.asarray(segmentation.resize(logits, batch['mask'].shape[-2:], 'bilinear'))
  mask = batch['mask']
  valid = mask != 255
  logp = up - np.log(np.exp(up - up.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - up.max(-1, keepdims=True)
  ce = [-(np.take_along_axis(logp[o], np.where(valid, mask, 0)[..., None], -1)[..., 0])[valid]
        .mean() for o in range(3)]
  # L1 over the partitioned bn2 scales: all ones at init, so it counts the penalised channels.
  scales = segmentation.exchange_scales(state.params)
  l1 = sum(s.shape[1] // 2 + (s.shape[1] - s.shape[1] // 2) for s in scales)
  expected = sum(ce) + 3 * config.train.l1_lambda * l1
  config.train.lr_enc = (0.0, 0.0)
  config.train.lr_dec = (0.0, 0.0)
  config.model.frozen_bn = True  # eval-mode BN, so the forward above is the training forward
  _, scalars = run_steps(config, jax.devices()[:1], [batch])
  np.testing.assert_allclose(total_losses(scalars)[0], expected, rtol=1e-5)


def test_stage_learning_rates_and_boundaries():
  config = tiny_config()
  starts = train.stage_starts(config, steps_per_epoch=3)
  assert starts == [0, 3, 6]
  got = [tuple(float(v) for v in segmentation.stage_learning_rates(config, starts, s))
         for s in range(6)]
  np.testing.assert_allclose(got, [(0.05, 0.1)] * 3 + [(0.01, 0.02)] * 3, rtol=1e-7)
  config.train.max_steps = 4
  assert segmentation.total_steps(config, 3) == 4


def test_test_time_augmentation_averages_flipped_and_scaled_logits():
  config = tiny_config()
  model = train.build(config)
  state = train.create_state(config, model, jax.random.key(0))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  x = np.random.RandomState(1).randn(2, 1, 24, 28, 3).astype(np.float32)
  label_size = (24, 28)

  def plain(xin):
    logits = segmentation.stacked_logits(model.apply(variables, xin, train=False))
    return np.asarray(segmentation.resize(logits, label_size, 'bilinear'))

  base = segmentation.predict_logits(variables, x, model=model, config=config,
                                     label_size=label_size, method='bilinear')
  np.testing.assert_allclose(base, plain(x), rtol=1e-6, atol=1e-6)
  config.data.tta_flip = True
  config.data.tta_scales = (1.0, 0.5)
  tta = segmentation.predict_logits(variables, x, model=model, config=config,
                                    label_size=label_size, method='bilinear')
  half = np.asarray(segmentation.resize(x, (12, 14), 'bilinear'))
  expected = (plain(x) + plain(x[..., ::-1, :])[..., ::-1, :]
              + plain(half) + plain(half[..., ::-1, :])[..., ::-1, :]) / 4
  np.testing.assert_allclose(tta, expected, rtol=1e-5, atol=1e-5)
  assert not np.allclose(tta, base, atol=1e-3)  # the augmentation did change something


def test_gradient_clipping_scales_by_the_global_norm():
  """clip_gradients(g, c) = g * min(1, c / (||g|| + 1e-6)), ||g|| over all leaves (torch's
  clip_grad_norm_), computed by hand here."""
  rng = np.random.RandomState(0)
  grads = {'a': rng.randn(3, 4).astype(np.float32), 'b': {'c': rng.randn(5).astype(np.float32)}}
  norm = np.sqrt(np.sum(grads['a'] ** 2) + np.sum(grads['b']['c'] ** 2))
  for max_norm, factor in ((0.25 * norm, 0.25 * norm / (norm + 1e-6)), (2.0 * norm, 1.0),
                           (0.0, 1.0)):
    got = segmentation.clip_gradients(grads, max_norm)
    np.testing.assert_allclose(got['a'], grads['a'] * factor, rtol=1e-6)
    np.testing.assert_allclose(got['b']['c'], grads['b']['c'] * factor, rtol=1e-6)


def test_data_parallel_step_with_clipping_equals_single_device():
  """The norm is taken over the gradients summed across devices: one global norm."""
  config = tiny_config()
  config.train.clip_grad_norm = 0.05  # well below the tiny model's gradient norm: it clips
  batches = [random_batch(config, 8, seed=s) for s in range(2)]
  single, _ = run_steps(config, jax.devices()[:1], batches)
  multi, _ = run_steps(config, jax.devices(), batches)
  assert_trees_close(multi.params, single.params)
  config.train.clip_grad_norm = 0.0
  unclipped, _ = run_steps(config, jax.devices()[:1], batches)
  moved = lambda s: max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                        zip(jax.tree.leaves(s.params), jax.tree.leaves(
                            train.create_state(config, train.build(config),
                                               jax.random.key(0)).params)))
  assert moved(single) < moved(unclipped)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_all_finite_flags_any_inf_or_nan_and_nothing_else(dtype):
  """The NaN guard's flag against numpy's isfinite over every element: huge finite values
  (whose plain sum would overflow) and integer leaves are finite; one NaN, +inf or -inf
  anywhere in any tree is not."""
  big = float(jnp.finfo(dtype).max)
  trees = ({'a': jnp.full((3, 4), big, dtype), 'b': jnp.arange(5, dtype=jnp.int32)},
           [jnp.asarray(-big, dtype), jnp.ones((2, 2, 2), dtype)])
  assert bool(runtime.all_finite(*trees))
  assert bool(runtime.all_finite())
  leaves, treedef = jax.tree.flatten(trees)
  for i, leaf in enumerate(leaves):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      continue
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
      broken = list(leaves)
      broken[i] = leaf.reshape(-1).at[-1].set(bad).reshape(leaf.shape)
      expected = all(np.isfinite(np.asarray(x, np.float64)).all() for x in broken)
      assert expected is False
      assert bool(runtime.all_finite(*jax.tree.unflatten(treedef, broken))) is expected
