"""One process of a multi-process CPU run (spawned by test_multiprocess.py).

argv: coordinator_port process_id num_processes parallel out.npz
Runs two train steps of the tiny config on the global batch of tests/test_train_step.py,
feeding only this process's rows, and writes the resulting parameters (process 0).
"""

import os
import sys

port, process_id, num_processes, parallel, out = sys.argv[1:6]
process_id, num_processes = int(process_id), int(num_processes)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.helpers.env import cache_from_every_process, xla_flags  # noqa: E402

os.environ['XLA_FLAGS'] = xla_flags(num_devices=4)
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import numpy as np  # noqa: E402

cache_from_every_process()

jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}',
                           num_processes=num_processes, process_id=process_id)

from cen_jax import models, train  # noqa: E402
from tests.unit.test_train_step import random_batch  # noqa: E402
from tests.helpers.tiny import tiny_config  # noqa: E402

config = tiny_config()
config.train.parallel = parallel
model = train.build(config)
runner = train.Runner(config, model, train.stage_starts(config, steps_per_epoch=2))
state = runner.place_state(train.create_state(config, model, jax.random.key(0)))
rows = slice(process_id * 8 // num_processes, (process_id + 1) * 8 // num_processes)
for seed in range(2):
  batch = random_batch(config, 8, seed=seed)
  state, scalars = runner.step(state, {k: v[rows] for k, v in batch.items()})
# The state is replicated on every device: any local shard is the whole value.
params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
if process_id == 0:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  np.savez(out, loss=np.asarray(scalars['loss/total'].addressable_data(0)),
           **{models.path_str(p): np.asarray(v) for p, v in flat})
jax.distributed.shutdown()
