"""Checkpoints: restore on another device count, best + latest retention, model mismatch."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cen_jax import checkpoints as ckpt_lib
from cen_jax import train
from tests.helpers.tiny import tiny_config


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


def save_one(tmp_path, config, state, step: int) -> None:
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), async_save=False)
  ckpts.save(step, state, ckpt_lib.model_meta(config, state.params))
  ckpts.close()


def test_refuses_another_model(tmp_path):
  config = tiny_config()
  state = make_state(config)
  save_one(tmp_path, config, state, 1)
  other = tiny_config(num_classes=7)
  other_meta = ckpt_lib.model_meta(other, make_state(other).params)
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as e:
    ckpt_lib.Checkpoints(str(tmp_path)).check_compatible(other_meta, 'W')
  message = str(e.value)
  assert '\n' not in message
  assert "'clf_conv/bias'" in message and '(5,)' in message and '(7,)' in message
  # restore_weights reads arrays as stored (numpy), then checks them against the model.
  target = ckpt_lib.abstract_like(make_state(other), sharding_on(jax.devices()[:1]))
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError) as e:
    ckpt_lib.Checkpoints(str(tmp_path), read_only=True).restore_weights(1, target)
  message = str(e.value)
  assert '\n' not in message and 'clf_conv/bias' in message
  assert '(5,)' in message and '(7,)' in message
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


def saved_steps(tmp_path, steps=(11, 12), iterator=None):
  """A workdir with a checkpoint at each of `steps` (with `iterator`'s position, if given);
  (ckpts, restore target, config)."""
  config = tiny_config()
  state = make_state(config)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), async_save=False)
  for step in steps:
    ckpts.save(step, state, ckpt_lib.model_meta(config, state.params), data_iterator=iterator)
  ckpts.wait()
  return ckpts, ckpt_lib.abstract_like(make_state(config, seed=1),
                                       sharding_on(jax.devices()[:1])), config


def _files(step_dir, part):
  import glob
  import os
  return [f for f in glob.glob(os.path.join(step_dir, part, '**', '*'), recursive=True)
          if os.path.isfile(f)]


def _flip_a_byte(path):
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF
    f.seek(0)
    f.write(bytes(data))


def _truncate(path):
  import os
  os.truncate(path, 5)


def _damage(step_dir, kind):
  import os
  import shutil
  data_files = [f for f in _files(step_dir, 'state') if os.sep + 'd' + os.sep in f]
  if kind == 'truncated array file':
    for f in data_files:
      _truncate(f)
  elif kind == 'missing array file':
    for f in data_files:
      os.remove(f)
  elif kind == 'flipped byte':
    for f in data_files:
      _flip_a_byte(f)
  elif kind == 'missing state':
    shutil.rmtree(os.path.join(step_dir, 'state'))
  elif kind == 'truncated state metadata':
    _truncate(os.path.join(step_dir, 'state', '_METADATA'))
  elif kind == 'truncated meta':
    for f in _files(step_dir, 'meta'):
      if os.path.basename(f) == 'metadata':
        _truncate(f)
  elif kind == 'truncated input position':
    for f in _files(step_dir, 'data'):
      _truncate(f)
  elif kind == 'missing input position':
    shutil.rmtree(os.path.join(step_dir, 'data'))


@pytest.mark.parametrize('kind', [
    'truncated array file', 'missing array file', 'flipped byte', 'missing state',
    'truncated state metadata', 'truncated meta', 'truncated input position',
    'missing input position'])
def test_damaged_step_is_set_aside_and_the_older_one_restored(tmp_path, kind):
  import os
  it = CountingIterator()
  ckpts, target, _ = saved_steps(tmp_path, iterator=it)
  _damage(os.path.join(ckpts.directory, '12'), kind)
  fresh = CountingIterator()
  _, step = ckpts.restore_first_intact([12, 11], target, data_iterator=fresh, set_aside=True)
  assert step == 11 and fresh.position == 0
  assert ckpts.all_steps() == [11]
  assert os.listdir(tmp_path / 'checkpoints_corrupt') == ['12']
  log = (tmp_path / 'restore_errors.log').read_text()
  assert 'step 12' in log and 'Traceback' in log  # the whole error, not 160 characters
  ckpts.close()


@pytest.mark.parametrize('error', [MemoryError('injected: out of memory'),
                                   OSError(5, 'injected: Input/output error'),
                                   TypeError('injected: a bug')])
def test_an_error_that_is_not_damage_stops_with_itself_and_moves_nothing(tmp_path, error):
  import os
  ckpts, target, config = saved_steps(tmp_path)
  restore = ckpts.manager.restore

  def failing(step, *args, **kwargs):
    if step == 12:
      raise error
    return restore(step, *args, **kwargs)

  ckpts.manager.restore = failing
  with pytest.raises(type(error), match='injected'):
    ckpts.restore_first_intact([12, 11], target, set_aside=True)
  with pytest.raises(type(error), match='injected'):  # reading the meta, too
    ckpts.check_compatible(ckpt_lib.model_meta(config, make_state(config).params), 'W')
  assert ckpts.all_steps() == [11, 12]
  assert not os.path.exists(tmp_path / 'checkpoints_corrupt')
  assert not os.path.exists(tmp_path / 'restore_errors.log')
  ckpts.close()


def test_damage_is_told_from_other_errors():
  import json
  assert ckpt_lib.is_damage(ValueError('DATA_LOSS: Error decoding b-tree node'))
  assert ckpt_lib.is_damage(ValueError('OUT_OF_RANGE: Requested byte range [0, 285)'))
  assert ckpt_lib.is_damage(FileNotFoundError('x'))
  assert ckpt_lib.is_damage(json.JSONDecodeError('Unterminated string', '{"a', 1))
  assert not ckpt_lib.is_damage(ValueError('UNAVAILABLE: connection reset'))
  assert not ckpt_lib.is_damage(ValueError('shapes (3,) and (4,) differ'))
  assert not ckpt_lib.is_damage(MemoryError())
  assert not ckpt_lib.is_damage(PermissionError(13, 'Permission denied'))
  wrapped = RuntimeError('restore failed')
  wrapped.__cause__ = FileNotFoundError('gone')
  assert ckpt_lib.is_damage(wrapped)


def test_input_position_of_another_process_count_is_one_error(tmp_path):
  import os
  it = CountingIterator()
  ckpts, target, _ = saved_steps(tmp_path, steps=(12,), iterator=it)
  data_dir = os.path.join(ckpts.directory, '12', 'data')
  saved = 'process_0-of-1.json'
  assert saved in os.listdir(data_dir)
  for i in range(2):
    os.link(os.path.join(data_dir, saved), os.path.join(data_dir, f'process_{i}-of-2.json'))
  os.remove(os.path.join(data_dir, saved))
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    ckpts.restore_first_intact([12], target, data_iterator=CountingIterator(), set_aside=True)
  message = str(e.value)
  assert '\n' not in message and 'another number of processes' in message
  assert 'process_0-of-2.json' in message and data_dir in message
  assert ckpts.all_steps() == [12]  # not damage: nothing moved
  ckpts.close()


def test_input_position_that_does_not_fit_the_run_is_an_error(tmp_path):
  """An iterator that refuses the saved position (here: another batch size) stops the run
  instead of restarting the input stream from its first batch."""

  class Fingerprinted(CountingIterator):
    def __init__(self, batch_size):
      super().__init__()
      self.batch_size = batch_size

    def get_state(self):
      return {'position': self.position, 'batch_size': self.batch_size}

    def set_state(self, state):
      if state['batch_size'] != self.batch_size:
        raise ValueError(f'data iterator state was saved with batch_size={state["batch_size"]}')
      self.position = state['position']

  ckpts, target, _ = saved_steps(tmp_path, steps=(12,), iterator=Fingerprinted(8))
  with pytest.raises(ValueError, match='saved with batch_size=8'):
    ckpts.restore_first_intact([12], target, data_iterator=Fingerprinted(4), set_aside=True)
  assert ckpts.all_steps() == [12]
  ckpts.close()


def test_an_imported_step_0_without_input_position_starts_the_input_from_its_beginning(
    tmp_path):
  ckpts, target, _ = saved_steps(tmp_path, steps=(0,))  # as --mode import writes it
  fresh = CountingIterator()
  _, step = ckpts.restore_first_intact([0], target, data_iterator=fresh, set_aside=True)
  assert step == 0 and fresh.position == 0
  ckpts.close()


def moved_state(config):
  """A state whose step, params and batch_stats all hold values a fresh state does not."""
  state = make_state(config)
  return state.replace(step=state.step + 7,
                       params=jax.tree.map(lambda x: x + 0.5, state.params),
                       batch_stats=jax.tree.map(lambda x: x * 2.0 + 1.0, state.batch_stats))


def test_restore_weights_reads_the_state_but_its_optimiser_state_as_host_arrays(tmp_path):
  config = tiny_config()
  state = moved_state(config)
  save_one(tmp_path, config, state, 4)
  target = ckpt_lib.abstract_like(make_state(config, seed=1), sharding_on(jax.devices()))
  weights = ckpt_lib.Checkpoints(str(tmp_path), read_only=True).restore_weights(4, target)
  assert weights.opt_state is None
  for name in ('step', 'params', 'batch_stats'):
    saved, read = getattr(state, name), getattr(weights, name)
    assert jax.tree.structure(read) == jax.tree.structure(saved)
    for a, b in zip(jax.tree.leaves(read), jax.tree.leaves(saved)):
      assert isinstance(a, np.ndarray)  # on the host: eval and predict place them
      np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize('kind', [
    'truncated array file', 'missing array file', 'flipped byte', 'missing state',
    'truncated state metadata', 'truncated meta'])
def test_restore_weights_skips_a_damaged_step_too(tmp_path, kind):
  import os
  ckpts, target, _ = saved_steps(tmp_path)
  _damage(os.path.join(ckpts.directory, '12'), kind)
  weights, step = ckpts.restore_first_intact([12, 11], target, weights_only=True)
  assert step == 11 and weights.opt_state is None
  assert sorted(ckpts.all_steps()) == [11, 12]  # eval and predict move nothing
  ckpts.close()
