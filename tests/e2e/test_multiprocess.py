"""A 2-process run on loopback (jax.distributed, CPU collectives) equals a 1-process run."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from cen_jax import models
from tests.unit.test_train_step import random_batch, run_steps, total_losses
from tests.helpers.tiny import tiny_config
from tests.helpers.env import child_env

# One xdist worker runs every multi-process test, one after the other (scripts/test.sh,
# --dist loadgroup): two at once on 2 cores can starve a process past gloo's fixed 30 s wait
# at the first collective.
pytestmark = pytest.mark.xdist_group('multiprocess')

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'helpers',
                      'multiprocess_worker.py')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('parallel', ['pmap', 'shard_map'])
def test_two_processes_match_one(tmp_path, parallel):
  out = str(tmp_path / 'params.npz')
  port = free_port()
  env = child_env()
  procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), '2', parallel, out],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[0].decode() for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  got = np.load(out)

  config = tiny_config()
  batches = [random_batch(config, 8, seed=s) for s in range(2)]
  state, scalars = run_steps(config, jax.devices()[:1], batches)
  flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
  assert set(got.files) - {'loss'} == {models.path_str(p) for p, _ in flat}
  for path, value in flat:
    np.testing.assert_allclose(got[models.path_str(path)], np.asarray(value),
                               rtol=2e-5, atol=2e-6, err_msg=models.path_str(path))
  np.testing.assert_allclose(float(got['loss']), total_losses(scalars)[-1], rtol=1e-5)
