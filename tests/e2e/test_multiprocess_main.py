"""main.py on two processes as a user runs it (jax.distributed on loopback, one CPU device each,
one shared workdir and data_dir, as two hosts with a shared filesystem) trains, checkpoints,
survives a SIGKILL of both processes, resumes and evaluates like one process with two devices:
the same per-step losses and final metrics, with pmap and with shard_map. The dataset is
prepared by process 0 only; metrics, eval results and previews are written by process 0."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers.env import child_env

# One xdist worker runs every multi-process test, one after the other (scripts/test.sh,
# --dist loadgroup): two at once on 2 cores can starve a process past gloo's fixed 30 s wait
# at the first collective.
pytestmark = pytest.mark.xdist_group('multiprocess')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'tests', 'helpers', 'configs', 'tiny_synthetic.py')
WORKER = os.path.join(ROOT, 'tests', 'helpers', 'multiprocess_main_worker.py')
NUM_STEPS = 4  # 2 steps an epoch; a stage (optimiser reset) at step 2; one eval, at step 4
SCHEDULE = ['--config.train.stage_epochs=(1,1)', '--config.train.lr_enc=(0.002,0.002)',
            '--config.train.lr_dec=(0.002,0.002)', '--config.train.eval_every_epochs=2']
KILL_AT = 4  # both processes die before their 4th step: checkpoints 1 and 2 are committed
TIMEOUT = 900


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(num_devices: int) -> dict:
  env = child_env(num_devices)
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def run(tmp_path, name, flags, *, processes: int, kill_at: int = 0, builds=None):
  """main.py (through the worker: SIGKILL before step kill_at, dataset builds recorded) on
  `processes` processes with one CPU device each, or on one process with two devices.
  Returns [(returncode, log)] per process."""
  builds = builds or str(tmp_path / f'{name}.builds')
  port = free_port()
  procs, logs = [], []
  for i in range(processes):
    distributed = [] if processes == 1 else [
        '--config.distributed.initialize=True',
        f'--config.distributed.coordinator_address=127.0.0.1:{port}',
        f'--config.distributed.num_processes={processes}', f'--config.distributed.process_id={i}']
    log = open(tmp_path / f'{name}.{i}.log', 'w+')
    cmd = [sys.executable, WORKER, str(kill_at), builds, f'--config={CONFIG}', *flags,
           *distributed]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env=environment(2 if processes == 1 else 1)))
    logs.append(log)
  deadline = time.monotonic() + TIMEOUT
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  out = []
  for p, log in zip(procs, logs):
    log.seek(0)
    out.append((p.returncode, log.read()))
    log.close()
  return out


def assert_ok(results):
  for i, (code, log) in enumerate(results):
    assert code == 0, f'process {i} exited {code}:\n{log[-4000:]}'


def step_losses(workdir) -> dict:
  """{step: loss/total} from metrics.jsonl (a replayed step's last line)."""
  losses = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      entry = json.loads(line)
      if 'loss/total' in entry:
        losses[entry['step']] = entry['loss/total']
  return losses


def latest_step(workdir):
  steps = [int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit()]
  return max(steps) if steps else None


@pytest.mark.parametrize('parallel', ['pmap', 'shard_map'])
def test_two_processes_through_main_match_one_process_with_two_devices(tmp_path, parallel):
  data_dir = str(tmp_path / 'tfds')  # not prepared yet: the two-process run prepares it
  common = [*SCHEDULE, f'--config.train.parallel={parallel}',
            f'--config.data.data_dir={data_dir}']
  two = str(tmp_path / 'two')
  started = time.perf_counter()

  # Two processes, killed (SIGKILL) before step KILL_AT, after checkpoints were saved.
  killed = run(tmp_path, 'killed', [*common, f'--workdir={two}'], processes=2,
               kill_at=KILL_AT)
  for i, (code, log) in enumerate(killed):
    assert code == -signal.SIGKILL, f'process {i} exited {code}:\n{log[-4000:]}'
  with open(tmp_path / 'killed.builds') as f:
    assert f.read().split() == ['0']  # prepared by process 0 only; process 1 waited
  survived = latest_step(two)
  assert survived is not None and 1 <= survived < KILL_AT

  # One process with two devices: the reference.
  one = str(tmp_path / 'one')
  assert_ok(run(tmp_path, 'one', [*common, f'--workdir={one}'], processes=1))

  # The same two-process command resumes from the newest checkpoint and finishes.
  resumed = run(tmp_path, 'resumed', [*common, f'--workdir={two}'], processes=2)
  assert_ok(resumed)
  assert f'step {NUM_STEPS}:' in resumed[0][1]  # the eval line: process 0 prints it
  assert f'step {NUM_STEPS}:' not in resumed[1][1]

  reference, got = step_losses(one), step_losses(two)
  assert sorted(reference) == sorted(got) == list(range(1, NUM_STEPS + 1))
  relative = max(abs(got[s] - reference[s]) / abs(reference[s]) for s in reference)
  with open(os.path.join(one, 'eval_results.json')) as f:
    expected = json.load(f)
  with open(os.path.join(two, 'eval_results.json')) as f:
    results = json.load(f)
  print(f'{parallel}: resumed from step {survived}; max relative per-step loss difference '
        f'{relative:.3g}; metrics (2 processes) {results["metrics"]}; (1 process) '
        f'{expected["metrics"]}; {time.perf_counter() - started:.0f} s')
  assert relative <= 1e-4, (reference, got)
  assert results['step'] == expected['step'] == NUM_STEPS
  assert results['metrics'].keys() == expected['metrics'].keys()
  for name, scores in expected['metrics'].items():
    for key, value in scores.items():
      np.testing.assert_allclose(results['metrics'][name][key], value, rtol=1e-6,
                                 err_msg=f'{name}/{key}')
  assert os.path.isfile(os.path.join(two, 'previews', f'step_{NUM_STEPS:07d}.png'))
  assert latest_step(two) == NUM_STEPS

  # `--mode eval` on the two processes (each reads the weights, not the optimiser state, and
  # places them on every device) writes the same metrics again.
  os.remove(os.path.join(two, 'eval_results.json'))
  assert_ok(run(tmp_path, 'eval', [*common, f'--workdir={two}', '--mode=eval',
                                   f'--checkpoint={NUM_STEPS}'], processes=2))
  with open(os.path.join(two, 'eval_results.json')) as f:
    evaluated = json.load(f)
  for name, scores in expected['metrics'].items():
    for key, value in scores.items():
      np.testing.assert_allclose(evaluated['metrics'][name][key], value, rtol=1e-6,
                                 err_msg=f'eval: {name}/{key}')
  assert sorted(os.listdir(os.path.join(two, 'checkpoints', str(NUM_STEPS), 'data'))) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']  # input positions


def test_a_failed_prepare_on_process_0_stops_the_others_with_one_line(tmp_path):
  flags = ['--mode=prepare', '--config.data.name=nyudv2', '--config.data.builder_config=default',
           f'--config.data.manual_dir={tmp_path / "nowhere"}',
           f'--config.data.data_dir={tmp_path / "tfds"}']
  results = run(tmp_path, 'prepare', flags, processes=2)
  errors = []
  for i, (code, log) in enumerate(results):
    assert code == 2, f'process {i} exited {code}:\n{log[-4000:]}'
    lines = [l for l in log.splitlines() if l.startswith('error:')]
    assert len(lines) == 1, log
    errors.append(lines[0])
  assert 'nowhere' in errors[0] and 'manual dir' in errors[0]
  assert "process 0 failed to prepare 'nyudv2'" in errors[1] and 'nowhere' in errors[1]
  assert not os.path.exists(tmp_path / 'prepare.builds')
