"""Runs main.py's training in-process and SIGKILLs itself inside training step `kill_at`.

argv: kill_at, then main.py's flags.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
kill_at = int(sys.argv.pop(1))

from cen_jax import train  # noqa: E402

_step = train.Runner.step
calls = {'n': 0}


def step_then_die(self, state, batch):
  calls['n'] += 1
  out = _step(self, state, batch)
  if calls['n'] == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)
  return out


train.Runner.step = step_then_die

import main  # noqa: E402
from absl import app  # noqa: E402

app.run(main.main, flags_parser=main.parse_flags)
