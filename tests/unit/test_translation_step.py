"""Translation GAN step: data-parallel equals one device; losses equal a hand computation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import train
from cen_jax.fusion import ops
from cen_jax.tasks import translation
from tests.unit.test_train_step import run_steps
from tests.helpers.tiny import tiny_translation_config


# Conv biases that feed an InstanceNorm (the tiny generator has 5 levels: conv2..conv4 and
# deconv1..deconv4 are normalised; the discriminator normalises conv2..conv4), and the running
# means of those norms.
NOISY = re.compile(r'^(generator/(conv[2-4]|deconv[1-4])/(conv/bias|deconv/bias|insnorm_\w+/mean)'
                   r'|discriminator/conv[2-4]/(conv/bias|insnorm/mean))$')


def _leaves(tree, *, noisy: bool) -> dict:
  """{path: array} of the leaves that are (or are not) in NOISY. (Optimiser-state paths never
  match: the Adam moments of those biases are rounding-sized and agree tightly.)"""
  from cen_jax.models import path_str
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(p): np.asarray(v) for p, v in flat
          if bool(NOISY.match(path_str(p))) == noisy}


def random_batch(config, batch, seed=0):
  rng = np.random.RandomState(seed)
  size = config.data.crop_size
  out = {n: np.tanh(rng.randn(batch, size, size, 3)).astype(np.float32)
         for n in config.modalities}
  targets = () if translation.has_ensemble(config) else (len(config.branches),)
  out['target'] = np.tanh(rng.randn(batch, *targets, size, size, 3)).astype(np.float32)
  return out


def cycle_config():
  """Cycle fusion over three domains: branch m reads domain m, predicts domain m + 1 mod 3."""
  from cen_jax import branches
  config = tiny_translation_config()
  config.modalities = ('reshading', 'edge_texture', 'rgb')
  config.branches = branches.cycle(config.modalities)
  config.data.target = ''
  return config


CONFIGS = {'official': tiny_translation_config, 'cycle': cycle_config}


@pytest.mark.parametrize('parallel,kind', [('pmap', 'official'), ('shard_map', 'official'),
                                           ('pmap', 'cycle')])
def test_data_parallel_gan_step_equals_single_device(parallel, kind):
  assert jax.device_count() == 8
  config = CONFIGS[kind]()
  config.model.dropout = 0.0  # dropout masks depend on the device layout; the rest must not
  # Cycle: one step. Its tiny U-Net normalises 2x2 maps in three exchanging branches, where the
  # first step's Adam noise (below) moves the second step's gradients by up to 1%.
  num_steps = 2 if kind == 'official' else 1
  batches = [random_batch(config, 8, seed=s) for s in range(num_steps)]
  config.train.parallel = 'pmap'
  single, single_scalars = run_steps(config, jax.devices()[:1], batches)
  config.train.parallel = parallel
  multi, multi_scalars = run_steps(config, jax.devices(), batches)
  for a, b in zip(single_scalars, multi_scalars):
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6, err_msg=key)
  assert int(multi.step) == int(single.step) == num_steps
  # A conv bias followed by an InstanceNorm has a zero gradient (the norm removes the mean), so
  # its computed gradient is rounding noise that Adam scales up to steps of up to lr: those
  # biases, and the running means of the norms they feed, agree within 2 steps x lr; every
  # other parameter, statistic and optimiser moment agrees tightly.
  lr = max(config.train.lr_g, config.train.lr_d)
  for part in ('params', 'batch_stats', 'opt_state'):
    for noisy in (True, False):
      a = _leaves(getattr(multi, part), noisy=noisy)
      b = _leaves(getattr(single, part), noisy=noisy)
      assert a.keys() == b.keys() and (a or not noisy or part == 'opt_state')
      for key in a:
        # Cycle: a few kernel entries have near-zero gradients, which Adam's first step turns
        # into steps of up to ~5% of lr.
        tight = dict(rtol=1e-4, atol=1e-6 if kind == 'official' else 0.1 * lr)
        tolerance = dict(rtol=0, atol=2 * 2 * lr) if noisy else tight
        np.testing.assert_allclose(a[key], b[key], err_msg=key, **tolerance)
  # Both networks trained, and both networks' running statistics moved.
  fresh = train.create_state(config, train.build(config), jax.random.key(0))
  for net in translation.NETS:
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         multi.params[net], fresh.params[net])
    assert max(jax.tree.leaves(moved)) > 1e-5, net
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         multi.batch_stats[net], fresh.batch_stats[net])
    assert max(jax.tree.leaves(moved)) > 1e-5, net


def _np_bce(prob, real):
  """torch.nn.BCELoss (mean), with its log clamp at -100."""
  prob = np.asarray(prob, np.float64)
  logs = np.maximum(np.log(prob if real else 1.0 - prob), -100.0)
  return -logs.mean()


@pytest.mark.parametrize('kind', ['official', 'cycle'])
def test_losses_match_hand_computation(kind):
  """With zero learning rates the logged losses are those of the initial networks:
  D = sum_m 0.5 (BCE(D(x_m, y_m), 1) + BCE(D(x_m, G_m), 0)),
  G = sum_m BCE(D(x_m, G_m), 1) + 100 * sum_o L1(o, y_o) + lambda * sum |partitioned IN scales|,
  y_m = y for every branch and the ensemble (official), or branch m's own target (cycle: no
  ensemble)."""
  config = CONFIGS[kind]()
  config.model.dropout = 0.0
  config.train.lr_g = config.train.lr_d = 0.0
  batch = random_batch(config, 2)
  model = train.build(config, axis_name=None)  # applied outside any mapped axis here
  state = train.create_state(config, model, jax.random.key(0))
  x = np.stack([batch[n] for n in config.modalities])
  num = len(config.modalities)
  # Targets of the outputs, by hand: the one target everywhere, or [B, M, ...] moved to [M, B, ...].
  y = np.broadcast_to(batch['target'], (num + 1,) + batch['target'].shape) if kind == 'official' \
      else np.stack([batch['target'][:, m] for m in range(num)])
  g_vars = translation.eval_variables(state)
  out, _ = model.generator.apply(g_vars, x, train=True, deterministic=True,
                                 mutable=['batch_stats'])
  outputs = np.asarray(translation.stacked_outputs(out))
  d_vars = {'params': state.params['discriminator'],
            'batch_stats': state.batch_stats['discriminator']}
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
  real_p = sigmoid(model.discriminator.apply(d_vars, x, y[:num], train=True,
                                             mutable=['batch_stats'])[0])
  fake_p = sigmoid(model.discriminator.apply(d_vars, x, outputs[:-1], train=True,
                                             mutable=['batch_stats'])[0])
  d_loss = sum(0.5 * (_np_bce(real_p[m], True) + _np_bce(fake_p[m], False)) for m in range(num))
  adversarial = sum(_np_bce(fake_p[m], True) for m in range(num))
  num_outputs = num + 1 if kind == 'official' else num
  assert len(translation.output_names(config)) == num_outputs
  pixel = [np.abs(outputs[o].astype(np.float64) - y[o]).mean() for o in range(num_outputs)]
  scales = translation.exchange_scales(state.params['generator'])
  slim = sum(int(ops.sparsity_masks(*s.shape).sum()) for s in scales)  # scales start at 1
  g_loss = adversarial + 100.0 * sum(pixel) + config.train.l1_lambda * slim

  _, scalars = run_steps(config, jax.devices()[:1], [batch])
  s = scalars[0]
  np.testing.assert_allclose(s['loss/discriminator'], d_loss, rtol=1e-5)
  np.testing.assert_allclose(s['loss/g_adversarial'], adversarial, rtol=1e-5)
  for o, name in enumerate(translation.output_names(config)):
    np.testing.assert_allclose(s[f'loss/l1_{name}'], pixel[o], rtol=1e-5)
  np.testing.assert_allclose(s['loss/slim'], slim, rtol=1e-6)
  np.testing.assert_allclose(s['loss/total'], g_loss, rtol=1e-5)


def test_sparsity_drives_penalised_scales_under_the_threshold():
  """A large L1 weight pulls the partitioned IN scales (and only those) under the threshold."""
  config = tiny_translation_config()
  config.train.l1_lambda = 50.0
  config.train.lr_g = 0.15  # Adam moves each scale by about lr per step
  batches = [random_batch(config, 8, seed=s) for s in range(5)]
  state, scalars = run_steps(config, jax.devices()[:1], batches)
  for name in config.modalities:
    assert scalars[-1][f'scales_below_threshold/{name}'] == 1.0
  penalised, free = [], []
  for scales in translation.exchange_scales(state.params['generator']):
    scales = np.abs(np.asarray(scales))
    masks = ops.sparsity_masks(*scales.shape)
    penalised.append(scales[masks])
    free.append(scales[~masks])
  assert np.concatenate(penalised).max() < config.model.threshold
  assert np.concatenate(free).mean() > np.concatenate(penalised).mean() + 0.3


def test_eval_is_reproducible_and_dropout_switchable():
  config = tiny_translation_config()
  model = train.build(config)
  state = train.create_state(config, model, jax.random.key(0))
  variables = translation.eval_variables(state)
  x = jnp.asarray(np.stack([random_batch(config, 2)[n] for n in config.modalities]))
  key = translation.eval_key(config, 0)
  a = translation.generate(variables, x, key, model=model, config=config)
  b = translation.generate(variables, x, key, model=model, config=config)
  c = translation.generate(variables, x, translation.eval_key(config, 1), model=model,
                           config=config)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))  # dropout on at test time (official)
  config.model.test_dropout = False
  d = translation.generate(variables, x, key, model=model, config=config)
  e = translation.generate(variables, x, translation.eval_key(config, 1), model=model,
                           config=config)
  np.testing.assert_array_equal(np.asarray(d), np.asarray(e))


def test_mit_gan_step_losses_by_hand_and_data_parallel_equals_single_device():
  """TokenFusion's translation networks on the same GAN step: the first step's D loss, pixel
  L1s and the official score penalty (sum |score| over every scored token of the global batch)
  are the initial networks' by hand (G's adversarial term reads the updated D, so it is left to
  test_losses_match_hand_computation, whose learning rates are 0), and 8 devices equal one
  over two steps. Threshold 0.5 so that tokens are exchanged; stochastic depth off (its masks
  depend on the device layout)."""
  from tests.helpers.tiny import tiny_mit_translation_config
  config = tiny_mit_translation_config('tokenfusion')
  config.model.threshold = 0.5
  config.model.drop_path_rate = 0.0
  config.train.l1_lambda = 1e-3
  batches = [random_batch(config, 8, seed=s) for s in range(2)]

  model = train.build(config, axis_name=None)
  state = train.create_state(config, model, jax.random.key(0))
  batch = batches[0]
  x = np.stack([batch[n] for n in config.modalities])
  num = len(config.modalities)
  g_vars = translation.eval_variables(state)
  out = model.generator.apply(g_vars, x, train=True, deterministic=True)
  below = np.mean([np.mean(np.asarray(m) < 0.5) for m in out['masks']])
  assert 0.05 < below < 0.95, below  # tokens are exchanged
  outputs = np.asarray(translation.stacked_outputs(out))
  d_vars = {'params': state.params['discriminator']}
  sigmoid = lambda z: 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
  y = np.broadcast_to(batch['target'], (num,) + batch['target'].shape)
  real_p = sigmoid(model.discriminator.apply(d_vars, x, y, train=True))
  fake_p = sigmoid(model.discriminator.apply(d_vars, x, outputs[:-1], train=True))
  d_loss = sum(0.5 * (_np_bce(real_p[m], True) + _np_bce(fake_p[m], False)) for m in range(num))
  pixel = [np.abs(outputs[o].astype(np.float64) - batch['target']).mean()
           for o in range(num + 1)]
  slim = sum(np.abs(np.asarray(m, np.float64)).sum() for m in out['masks'])

  config.train.parallel = 'pmap'
  single, single_scalars = run_steps(config, jax.devices()[:1], batches)
  s = single_scalars[0]
  np.testing.assert_allclose(s['loss/discriminator'], d_loss, rtol=1e-5)
  for o, name in enumerate(translation.output_names(config)):
    np.testing.assert_allclose(s[f'loss/l1_{name}'], pixel[o], rtol=1e-5)
  np.testing.assert_allclose(s['loss/slim'], slim, rtol=1e-5)
  np.testing.assert_allclose(s['loss/total'], s['loss/g_adversarial'] + 100.0 * sum(pixel)
                             + config.train.l1_lambda * slim, rtol=1e-5)

  config.train.parallel = 'shard_map'
  multi, multi_scalars = run_steps(config, jax.devices(), batches)
  for a, b in zip(single_scalars, multi_scalars):
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=2e-5, atol=1e-6, err_msg=key)
  # As the cycle case above: a few kernel entries have near-zero gradients (sums of larger terms
  # that cancel), whose rounding Adam's normalised step turns into differences of a good part
  # of lr: 1.1e-5 and 4.2e-5 (0.21 lr) in one of the 512 kv kernel entries of block_enc_4_0 on
  # two CPUs. Every entry is within Adam's own bound (at most lr a step, so 2 x steps x lr
  # apart), and all but at most 1% of each leaf's entries agree tightly.
  lr = max(config.train.lr_g, config.train.lr_d)
  for part in ('params', 'opt_state'):
    a, b = _leaves(getattr(multi, part), noisy=False), _leaves(getattr(single, part), noisy=False)
    assert a.keys() == b.keys()
    for key in a:
      loose = ~np.isclose(a[key], b[key], rtol=1e-4, atol=0.1 * lr)
      assert loose.mean() <= 0.01, (key, int(loose.sum()), loose.size)
      if part == 'params':
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=2 * len(batches) * lr,
                                   err_msg=key)
  for net in translation.NETS:  # `state`: the initial state both runs started from (key 0)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         multi.params[net], state.params[net])
    assert max(jax.tree.leaves(moved)) > 1e-5, net


def test_learning_rates_times_the_batch_with_lr_times_batch():
  config = tiny_translation_config()
  config.train.batch_size, config.train.lr_g, config.train.lr_d = 4, 2e-4, 1e-4
  assert translation.learning_rates(config) == (2e-4, 1e-4)  # CEN: unscaled
  config.train.lr_times_batch = True
  assert translation.learning_rates(config) == (2e-4 * 4, 1e-4 * 4)  # TokenFusion's main.py
