"""main.py as a user runs it, SIGKILLed just before its `kill_at`-th training step (spawned by
test_multiprocess_main.py; every process of a run gets the same kill_at, so all of them die
there, after the previous steps' checkpoints were started).

argv: kill_at (0: never), builds_file (gets the process index of every process that built a
dataset), then main.py's flags.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
kill_at = int(sys.argv.pop(1))
builds_file = sys.argv.pop(1)

from cen_jax import cli as main  # noqa: E402  (first: it sets up host memory before JAX starts)
from absl import app  # noqa: E402
from cen_jax import input_pipeline  # noqa: E402
from tests.helpers.env import cache_from_every_process  # noqa: E402

cache_from_every_process()

_place = input_pipeline._place


def recording_place(*args, **kwargs):
  import jax
  with open(builds_file, 'a') as f:
    f.write(f'{jax.process_index()}\n')
  return _place(*args, **kwargs)


input_pipeline._place = recording_place

if kill_at:
  from cen_jax import train

  _step = train.Runner.step
  calls = [0]

  def step_or_die(self, state, batch):
    calls[0] += 1
    if calls[0] == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return _step(self, state, batch)

  train.Runner.step = step_or_die

app.run(main.main, flags_parser=main.parse_flags)
