"""Runs main.py's training in-process, records each training step it makes, and signals itself
inside training step `kill_at`.

argv: kill_at[:SIGNAL] (SIGKILL unless e.g. '5:SIGTERM'; 'never' to only record), the file that
gets one line per step made (the state's step count before it), then main.py's flags.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
kill_at, _, signal_name = sys.argv.pop(1).partition(':')
kill_at = None if kill_at == 'never' else int(kill_at)
steps_file = sys.argv.pop(1)
signum = getattr(signal, signal_name or 'SIGKILL')

import jax  # noqa: E402

from cen_jax import train  # noqa: E402

_step = train.Runner.step
calls = {'n': 0}


def step_then_die(self, state, batch):
  calls['n'] += 1
  with open(steps_file, 'a') as f:  # written before the step: a kill inside it still counts
    f.write(f'{int(jax.device_get(state.step))}\n')
  out = _step(self, state, batch)
  if calls['n'] == kill_at:
    os.kill(os.getpid(), signum)
  return out


train.Runner.step = step_then_die

from cen_jax import cli as main  # noqa: E402
from absl import app  # noqa: E402

app.run(main.main, flags_parser=main.parse_flags)
