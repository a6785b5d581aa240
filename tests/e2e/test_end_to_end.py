"""main.py end to end on the tiny synthetic dataset: train/eval outputs, SIGKILL + resume,
command-line overrides, and one-line errors for bad input."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'tests', 'helpers', 'configs', 'tiny_synthetic.py')


def run_main(*args, script='main.py', data_dir, check=True):
  env = child_env()  # one CPU device
  cmd = [sys.executable, os.path.join(ROOT, script) if script == 'main.py' else script,
         *args, f'--config.data.data_dir={data_dir}']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  if check:
    assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def train_run(tmp_path_factory, config, data_dir) -> str:
  """A fresh workdir trained by main.py with `config` (the module-scoped `trained` runs)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  run_main(f'--config={config}', f'--workdir={workdir}', data_dir=data_dir)
  return workdir


def trained_run_fixtures(config):
  """An end-to-end module's fixtures `data_dir` (a fresh TFDS folder) and `trained` (a workdir
  trained by main.py with `config`), module-scoped: `data_dir, trained = ...(CONFIG)`."""

  @pytest.fixture(scope='module')
  def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('tfds'))

  @pytest.fixture(scope='module')
  def trained(tmp_path_factory, data_dir):
    return train_run(tmp_path_factory, config, data_dir)

  return data_dir, trained


data_dir, trained = trained_run_fixtures(CONFIG)


def final_params(workdir):
  from cen_jax import checkpoints
  import jax
  ckpts = checkpoints.Checkpoints(workdir, read_only=True)
  step = ckpts.latest_step()
  import orbax.checkpoint as ocp
  restored = ckpts.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  ckpts.close()
  return step, jax.tree.map(np.asarray, restored['state'])


def assert_same_final_state(workdir_a, workdir_b, *, step):
  """Both workdirs end at `step` with bit-identical training states (params, stats, optimiser)."""
  import jax
  step_a, state_a = final_params(workdir_a)
  step_b, state_b = final_params(workdir_b)
  assert step_a == step_b == step
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(a, b)


def test_train_writes_results_logs_and_previews(trained):
  with open(os.path.join(trained, 'eval_results.json')) as f:
    results = json.load(f)
  assert results['step'] == 8 and results['split'] == 'test'
  assert set(results['metrics']) == {'rgb', 'depth', 'ensemble'}
  for scores in results['metrics'].values():
    assert set(scores) == {'pixel_acc', 'mean_acc', 'miou'}
    assert all(0.0 <= v <= 100.0 for v in scores.values())
  lines = [json.loads(l) for l in open(os.path.join(trained, 'metrics.jsonl'))]
  steps = [l['step'] for l in lines if 'loss/total' in l]
  assert steps == list(range(1, 9))
  for key in ('lr/encoder', 'lr/decoder', 'alpha/rgb', 'alpha/depth', 'loss/ensemble',
              'scales_below_threshold/rgb', 'scales_below_threshold/depth'):
    assert key in lines[0], key
  assert any('eval/ensemble/miou' in l for l in lines)
  previews = os.listdir(os.path.join(trained, 'previews'))
  assert 'step_0000004.png' in previews and 'step_0000008.png' in previews
  assert os.listdir(os.path.join(trained, 'tensorboard'))


def test_eval_mode_reproduces_training_eval(trained, data_dir):
  with open(os.path.join(trained, 'eval_results.json')) as f:
    during = json.load(f)
  run_main(f'--config={CONFIG}', f'--workdir={trained}', '--mode=eval', '--checkpoint=8',
           data_dir=data_dir)
  with open(os.path.join(trained, 'eval_results.json')) as f:
    after = json.load(f)
  assert after == during


WORKER = os.path.join(ROOT, 'tests', 'helpers', 'kill_worker.py')


def worker_run(kill, *args, data_dir, check=True):
  """main.py through tests/kill_worker.py, signalled inside training step `kill` ('never': not
  at all): (process, the state's step before each training step the run made)."""
  import tempfile
  with tempfile.TemporaryDirectory() as scratch:
    made = os.path.join(scratch, 'steps.txt')
    proc = run_main(kill, made, *args, script=WORKER, data_dir=data_dir, check=check)
    steps = [int(line) for line in open(made)] if os.path.exists(made) else []
  return proc, steps


def logged_steps(workdir):
  from cen_jax import run_log as log_lib
  return [r['step'] for r in log_lib.read_metrics(workdir) if 'loss/total' in r]


def check_kill_and_resume(config, trained, workdir, data_dir, *, num_steps=8):
  """SIGKILL inside step 5, then resume: the rerun makes only the steps after the newest
  checkpoint saved before the kill, logs each step once, and ends bit-identical to the
  uninterrupted run."""
  killed, made = worker_run('5', f'--config={config}', f'--workdir={workdir}',
                            data_dir=data_dir, check=False)
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert made == [0, 1, 2, 3, 4]
  from cen_jax import checkpoints
  survived = checkpoints.Checkpoints(workdir, read_only=True).latest_step()
  assert survived is not None and 1 <= survived < num_steps  # saved before the kill
  _, made = worker_run('never', f'--config={config}', f'--workdir={workdir}', data_dir=data_dir)
  assert made == list(range(survived, num_steps))  # resumed, not restarted
  assert logged_steps(workdir) == list(range(1, num_steps + 1))  # no step logged twice
  assert_same_final_state(trained, workdir, step=num_steps)


def test_sigkill_and_resume_is_bit_identical(tmp_path, trained, data_dir):
  check_kill_and_resume(CONFIG, trained, str(tmp_path / 'killed'), data_dir)


def test_command_line_overrides(data_dir):
  out = run_main(f'--config={CONFIG}', '--mode=summary', '--config.model.num_classes=3',
                 data_dir=data_dir).stdout
  from cen_jax import models
  import jax, jax.numpy as jnp
  sys.path.insert(0, ROOT)
  from tests.helpers.configs import tiny_synthetic
  config = tiny_synthetic.get_config()
  config.model.num_classes = 3
  model = models.build_model(config)
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0)},
                                             jnp.zeros((2, 1, 16, 16, 3)), train=False))
  assert f'params: {models.count_params(shapes["params"])}' in out


ABSL_INFO_OR_WARNING = re.compile(r'^[IW]\d{4} \d\d:\d\d:\d\d')


def one_error_line(proc):
  lines = [l for l in proc.stderr.splitlines()
           if l.strip() and 'WARNING' not in l and not ABSL_INFO_OR_WARNING.match(l)]
  assert proc.returncode != 0
  assert len(lines) == 1, proc.stderr
  return lines[0]


def test_unknown_config_key_is_one_line(data_dir):
  line = one_error_line(run_main(f'--config={CONFIG}', '--mode=summary',
                                 '--config.train.batch_sizee=4', data_dir=data_dir,
                                 check=False))
  assert 'batch_sizee' in line


def test_unknown_mode_is_one_line(data_dir):
  line = one_error_line(run_main(f'--config={CONFIG}', '--mode=fly', '--workdir=/tmp/x',
                                 data_dir=data_dir, check=False))
  assert "'fly'" in line


def tree_digest(directory, *, skip=()):
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(set(files) - set(skip)):
      path = os.path.join(root, name)
      digest.update(path.encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def test_workdir_of_another_model_is_refused(trained, data_dir):
  before = tree_digest(trained)
  line = one_error_line(run_main(f'--config={CONFIG}', f'--workdir={trained}',
                                 '--config.model.num_classes=4', data_dir=data_dir,
                                 check=False))
  assert 'clf_conv' in line and '(4,)' in line
  assert tree_digest(trained) == before


# ----------------------------------------------------------------------------- long runs

def test_eval_prints_only_the_results_table(trained, data_dir):
  proc = run_main(f'--config={CONFIG}', f'--workdir={trained}', '--mode=eval', data_dir=data_dir)
  assert proc.stderr.strip() == '', proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert [l.split(':')[0].strip() for l in lines] == ['rgb', 'depth', 'ensemble']


def test_sigterm_saves_the_current_step_and_resume_is_bit_identical(tmp_path, trained,
                                                                    data_dir):
  workdir = str(tmp_path / 'preempted')
  no_periodic = '--config.train.checkpoint_every_steps=100'  # only the preemption saves step 3
  proc, made = worker_run('3:SIGTERM', f'--config={CONFIG}', f'--workdir={workdir}',
                          no_periodic, data_dir=data_dir)
  assert proc.returncode == 0
  assert 'preempted: saved step 3' in proc.stderr
  assert made == [0, 1, 2]  # the signal inside step 3 stops the loop before step 4
  from cen_jax import checkpoints
  assert checkpoints.Checkpoints(workdir, read_only=True).all_steps() == [3]
  _, made = worker_run('never', f'--config={CONFIG}', f'--workdir={workdir}', no_periodic,
                       data_dir=data_dir)
  assert made == [3, 4, 5, 6, 7]
  assert logged_steps(workdir) == list(range(1, 9))
  assert_same_final_state(trained, workdir, step=8)


def test_nonfinite_loss_stops_with_one_line_and_saves_nothing_nonfinite(tmp_path, data_dir):
  workdir = str(tmp_path / 'diverged')
  diverge = ['--config.train.lr_enc=(1e4,1e4)', '--config.train.lr_dec=(1e4,1e4)']
  proc = run_main(f'--config={CONFIG}', f'--workdir={workdir}', *diverge, data_dir=data_dir,
                  check=False)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'non-finite loss or gradients in steps' in errors[0]
  assert 'last good checkpoint: step' in errors[0]
  step, state = final_params(workdir)
  import jax
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))
  # With skip_nonfinite the run goes on, skipping those updates, and stays finite.
  skipped = str(tmp_path / 'skipped')
  run_main(f'--config={CONFIG}', f'--workdir={skipped}', *diverge,
           '--config.train.skip_nonfinite=True', data_dir=data_dir)
  step, state = final_params(skipped)
  assert step == 8
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))
  lines = [json.loads(l) for l in open(os.path.join(skipped, 'metrics.jsonl'))]
  assert max(l.get('train/skipped_steps', 0) for l in lines) >= 1


def _truncate_state_files(workdir, step):
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints', str(step), 'state')):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 64 and os.sep + 'd' + os.sep in path:  # array data files
        os.truncate(path, 10)


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tmp_path, trained, data_dir):
  import shutil
  workdir = str(tmp_path / 'damaged')
  shutil.copytree(trained, workdir)
  _truncate_state_files(workdir, 8)
  proc = run_main(f'--config={CONFIG}', f'--workdir={workdir}', '--mode=eval', data_dir=data_dir)
  warnings = proc.stderr.strip().splitlines()
  assert len(warnings) == 1 and 'checkpoint step 8 cannot be restored' in warnings[0], proc.stderr
  assert json.load(open(os.path.join(workdir, 'eval_results.json')))['step'] == 7
  # Resuming trains step 8 again from step 7 and ends where the intact run ended.
  proc, made = worker_run('never', f'--config={CONFIG}', f'--workdir={workdir}',
                          data_dir=data_dir)
  assert made == [7]
  assert proc.stderr.count('cannot be restored') == 1
  assert logged_steps(workdir) == list(range(1, 9))
  assert os.listdir(os.path.join(workdir, 'checkpoints_corrupt')) == ['8']
  assert_same_final_state(trained, workdir, step=8)


def test_no_intact_checkpoint_is_one_line_and_deletes_nothing(tmp_path, trained, data_dir):
  import shutil
  workdir = str(tmp_path / 'ruined')
  shutil.copytree(trained, workdir)
  for step in (7, 8):
    _truncate_state_files(workdir, step)
  before = tree_digest(workdir)
  for mode in ('eval', 'train'):
    proc = run_main(f'--config={CONFIG}', f'--workdir={workdir}', f'--mode={mode}',
                    data_dir=data_dir, check=False)
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
    assert len(errors) == 1 and 'no intact checkpoint' in errors[0], proc.stderr
    assert 'step 8' in errors[0] and 'step 7' in errors[0]
  # Only the log of why each step failed (whole errors) was added.
  assert tree_digest(workdir, skip=['restore_errors.log']) == before
  log = open(os.path.join(workdir, 'restore_errors.log')).read()
  assert log.count('step 8 in') == log.count('step 7 in') == 2 and 'Traceback' in log
