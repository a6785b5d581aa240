"""A forced re-prepare swaps the dataset in one atomic step: a crash at any point of the swap
leaves a readable dataset (the old or the new) at the dataset's path."""

import os
import shutil

import pytest

from cen_jax import config as config_lib
from cen_jax import input_pipeline as ip
from tests.helpers import data_fixtures as fx

OLD, NEW = 3, 4  # train examples of the first and of the re-prepared dataset


class Crash(BaseException):
  """Stands for the process dying: no handler in prepare catches it."""


def make_config(root):
  config = config_lib.base_config()
  config.data.name = 'nyudv2'
  config.data.data_dir = str(root / 'tfds')
  config.data.manual_dir = str(root / 'manual')
  return config


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """A data_dir prepared from OLD train examples, and manual data for NEW."""
  root = tmp_path_factory.mktemp('prepared')
  fx.write_manual_dir(root / 'manual', num_train=OLD, num_test=1)
  ip.prepare(make_config(root))
  fx.write_manual_dir(root / 'manual_new', num_train=NEW, num_test=1, seed=1)
  return root


def copy_of(prepared, tmp_path, *, legacy: bool):
  """A copy of the prepared data_dir; legacy: the dataset path is a real directory (as an
  older cen-jax or `tfds build` left it) instead of a link into <data_dir>/.prepared/."""
  shutil.copytree(prepared / 'tfds', tmp_path / 'tfds', symlinks=True)
  config = make_config(tmp_path)
  config.data.manual_dir = str(prepared / 'manual_new')
  target = ip.prepared_dir(config)
  assert os.path.islink(target)
  if legacy:
    copy = os.path.realpath(target)
    os.remove(target)
    shutil.move(copy, target)
  return config, target


def crash_at(monkeypatch, n):
  """The n-th filesystem step of the swap (ip._place: renames, links, deletions) raises Crash:
  nothing after it runs. Returns the step counter."""
  real_place = ip._place
  calls = [0]

  def failing(fn):
    def step(*args, **kwargs):
      calls[0] += 1
      if calls[0] == n:
        raise Crash(f'crash at step {n}: {fn.__name__}{args}')
      return fn(*args, **kwargs)
    return step

  def place(*args, **kwargs):
    with monkeypatch.context() as m:
      for module, name in ((os, 'rename'), (os, 'replace'), (os, 'symlink'),
                           (shutil, 'rmtree')):
        m.setattr(module, name, failing(getattr(module, name)))
      return real_place(*args, **kwargs)

  monkeypatch.setattr(ip, '_place', place)
  return calls


def train_count(target):
  return len(ip._Source(target, 'train'))


@pytest.mark.parametrize('legacy', [False, True], ids=['link', 'real_dir'])
def test_crash_at_any_step_of_a_forced_reprepare_leaves_a_dataset(prepared, tmp_path,
                                                                  monkeypatch, legacy):
  # Count the swap's steps with a crash-free run first.
  config, target = copy_of(prepared, tmp_path / 'count', legacy=legacy)
  calls = crash_at(monkeypatch, 0)
  ip.prepare(config, force=True)
  num_steps = calls[0]
  # link: new copy into the store, new link, os.replace of the link, removal of the old copy;
  # real_dir: new copy into the store, the real directory into the store, link, removal.
  assert num_steps == 4
  assert train_count(target) == NEW
  for n in range(1, num_steps + 1):
    config, target = copy_of(prepared, tmp_path / str(n), legacy=legacy)
    crash_at(monkeypatch, n)
    with pytest.raises(Crash):
      ip.prepare(config, force=True)
    monkeypatch.undo()
    linked = n == num_steps  # the new link is in place (only the old copy's removal left)
    if legacy and n == num_steps - 1:
      # Between moving the real directory into the store and linking the new copy the path
      # is empty for a moment; both copies are in the store and the next start (any reader:
      # they all go through prepare) links the newest.
      assert not os.path.lexists(target)
      assert ip.num_examples(config, 'train') == NEW
    else:
      assert ip.prepare(config) == target  # no rebuild: the path holds a dataset
    assert train_count(target) == (NEW if linked or (legacy and n == num_steps - 1)
                                   else OLD), n
    # A later forced re-prepare works and leaves one copy, no stray links or temporaries.
    ip.prepare(config, force=True)
    assert train_count(target) == NEW
    assert sorted(os.listdir(os.path.dirname(target))) == ['1.0.0']
    assert len(os.listdir(os.path.join(config.data.data_dir, ip.STORE))) == 1
    assert sorted(os.listdir(config.data.data_dir)) == [ip.STORE, 'nyudv2']


def test_readers_follow_the_link(prepared, tmp_path):
  config, target = copy_of(prepared, tmp_path, legacy=False)
  assert ip.num_examples(config, 'train') == OLD
  src = ip._Source(ip.prepared_dir(config), 'train')
  assert src[0]['rgb'].shape[-1] == 3
  ip.prepare(config, force=True)
  assert ip.num_examples(config, 'train') == NEW
  assert len(ip._Source(ip.prepared_dir(config), 'train')) == NEW
