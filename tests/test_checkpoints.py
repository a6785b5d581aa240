"""Checkpoints: restore on another device count, best + latest retention, model mismatch."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cen_jax import checkpoints as ckpt_lib
from cen_jax import train
from tests.tiny import tiny_config


def make_state(config, seed=0):
  return train.create_state(config, train.build(config), jax.random.key(seed))


def sharding_on(devices):
  return NamedSharding(Mesh(np.asarray(devices), ('data',)), P())


@pytest.mark.parametrize('num_devices', [1, 2])
def test_restore_on_another_device_count(tmp_path, num_devices):
  config = tiny_config()
  state = jax.device_put(make_state(config), sharding_on(jax.devices()))  # saved on 8 devices
  meta = ckpt_lib.model_meta(config, state.params)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path))
  ckpts.save(3, state, meta)
  ckpts.close()

  target = ckpt_lib.abstract_like(make_state(config, seed=1), sharding_on(jax.devices()[:num_devices]))
  restored = ckpt_lib.Checkpoints(str(tmp_path)).restore(3, target)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert len(a.sharding.device_set) == num_devices
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_keeps_latest_and_best(tmp_path):
  config = tiny_config()
  state = make_state(config)
  meta = ckpt_lib.model_meta(config, state.params)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), keep=2, async_save=False)
  ious = {1: 30.0, 2: 50.0, 3: 40.0, 4: None, 5: 20.0}
  for step, miou in ious.items():
    metrics = None if miou is None else {ckpt_lib.BEST_METRIC: miou}
    ckpts.save(step, state, meta, metrics=metrics)
  ckpts.wait()
  assert sorted(ckpts.all_steps()) == [2, 4, 5]  # best (50 at step 2) + the latest two
  assert ckpts.best_step() == 2
  assert ckpts.latest_step() == 5
  ckpts.close()


def test_refuses_another_model(tmp_path):
  config = tiny_config()
  state = make_state(config)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), async_save=False)
  ckpts.save(1, state, ckpt_lib.model_meta(config, state.params))
  ckpts.close()
  other = tiny_config(num_classes=7)
  other_meta = ckpt_lib.model_meta(other, make_state(other).params)
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as e:
    ckpt_lib.Checkpoints(str(tmp_path)).check_compatible(other_meta, 'W')
  message = str(e.value)
  assert '\n' not in message
  assert "'clf_conv/bias'" in message and '(5,)' in message and '(7,)' in message
  config.modalities = ('rgb',)
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match='modalities'):
    ckpt_lib.Checkpoints(str(tmp_path)).check_compatible(
        ckpt_lib.model_meta(config, state.params), 'W')


class CountingIterator:
  """A stand-in input iterator whose state is its position."""

  def __init__(self):
    self.position = 0

  def __next__(self):
    self.position += 1
    return self.position

  def get_state(self):
    return {'position': self.position}

  def set_state(self, state):
    self.position = state['position']


def test_data_iterator_state_round_trip(tmp_path):
  config = tiny_config()
  state = make_state(config)
  it = CountingIterator()
  for _ in range(5):
    next(it)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path))
  ckpts.save(5, state, ckpt_lib.model_meta(config, state.params), data_iterator=it)
  next(it)  # advancing after save must not change what was saved (snapshot at save time)
  ckpts.close()
  fresh = CountingIterator()
  ckpt_lib.Checkpoints(str(tmp_path)).restore(
      5, ckpt_lib.abstract_like(state, sharding_on(jax.devices()[:1])), data_iterator=fresh)
  assert next(fresh) == 6


def test_late_read_errors_of_a_reported_step_are_not_logged(tmp_path):
  """orbax's orphaned read tasks for a damaged step can log 'Task exception was never
  retrieved' after restore_first_intact has moved on; those records (and only those) are
  dropped, since the one-line warning already named the step."""
  import logging
  import os
  config = tiny_config()
  state = make_state(config)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), async_save=False)
  meta = ckpt_lib.model_meta(config, state.params)
  for step in (11, 12):
    ckpts.save(step, state, meta)
  ckpts.wait()
  damaged = os.path.join(ckpts.directory, '12')
  for root, _, files in os.walk(os.path.join(damaged, 'state')):
    for name in files:
      if os.sep + 'd' + os.sep in os.path.join(root, name):
        os.truncate(os.path.join(root, name), 10)
  _, step = ckpts.restore_first_intact([12, 11], ckpt_lib.abstract_like(
      make_state(config, seed=1), sharding_on(jax.devices()[:1])))
  assert step == 11
  ckpts.close()

  seen = []

  class Collect(logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  collect = Collect()
  logging.getLogger().addHandler(collect)
  try:
    asyncio_log = logging.getLogger('asyncio')
    def late_task_error(path):
      error = ValueError(f'OUT_OF_RANGE: Error reading local file "{path}": Requested byte range')
      asyncio_log.error('Task exception was never retrieved', exc_info=(ValueError, error, None))
    late_task_error(os.path.join(damaged, 'state', 'd', 'abc'))
    late_task_error(os.path.join(ckpts.directory, '1', 'state', 'd', 'abc'))  # not reported
    late_task_error(os.path.join(ckpts.directory, '121', 'state', 'd', 'abc'))  # nor this
  finally:
    logging.getLogger().removeHandler(collect)
  assert seen == ['Task exception was never retrieved'] * 2
