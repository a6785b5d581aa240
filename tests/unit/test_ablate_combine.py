"""`python -m cen_jax.ablate --combine LABEL=DIR,...`: finished ablations in one table and plot.
Run as a user runs it, in a process of its own: cen_jax.ablate defines absl flags that
cen_jax.cli defines too, so the two are never imported into one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'tests', 'helpers', 'configs', 'tiny_synthetic.py')


def combine(workdir, pairs):
  """(exit status, stdout lines, stderr) of the runner's --combine."""
  done = subprocess.run(
      [sys.executable, '-m', 'cen_jax.ablate', f'--config={CONFIG}', f'--workdir={workdir}',
       f'--combine={",".join(pairs)}'], cwd=ROOT, env=child_env(), capture_output=True,
      text=True, timeout=300)
  return done.returncode, done.stdout.splitlines(), done.stderr


def results(miou_rgb, miou_depth, miou_ensemble, step=300):
  return {'step': step, 'split': 'test', 'metrics': {
      'rgb': {'miou': miou_rgb}, 'depth': {'miou': miou_depth},
      'ensemble': {'miou': miou_ensemble}}}


def write_ablation(folder, rows):
  os.makedirs(folder)
  with open(os.path.join(folder, 'ablation.json'), 'w') as f:
    json.dump(rows, f)


def test_combined_rows_are_labelled_and_keep_every_seed(tmp_path):
  mit = [{'fusion': 'tokenfusion', 'params': 963209, 'step_seconds': 0.25, 'diverged': 1,
          'results': [results(50.0, 40.0, 60.0), results(52.0, 44.0, 62.0)]}]
  resnet = [{'fusion': 'cen', 'params': 205353, 'step_seconds': 0.08, 'diverged': 0,
             'results': [results(90.0, 91.0, 92.0), results(92.0, 93.0, 94.0),
                         results(91.0, 92.0, 93.0)]}]
  write_ablation(tmp_path / 'a', mit)
  write_ablation(tmp_path / 'b', resnet)
  out = str(tmp_path / 'both')
  code, lines, stderr = combine(out, [f'MiT={tmp_path / "a"}', f'ResNet={tmp_path / "b"}'])
  assert code == 0, stderr[-2000:]
  rows = {l.split(' | ')[0].strip('| `'): l.split(' | ') for l in lines if l.startswith('| `')}
  assert list(rows) == ['tokenfusion (MiT)', 'cen (ResNet)']
  assert rows['tokenfusion (MiT)'][1] == '2 (+1 diverged)'
  ensemble = np.array([92.0, 94.0, 93.0])
  assert f'{ensemble.mean():.2f} ± {ensemble.std():.2f}' in rows['cen (ResNet)']
  assert '963,209' in rows['tokenfusion (MiT)']
  saved = json.load(open(os.path.join(out, 'ablation.json')))
  assert [r['fusion'] for r in saved] == ['tokenfusion (MiT)', 'cen (ResNet)']
  assert saved[1]['results'] == resnet[0]['results']
  assert os.path.getsize(os.path.join(out, 'ablation.png')) > 1000
  assert open(os.path.join(out, 'ablation.md')).read().splitlines() == lines


@pytest.mark.parametrize('pair,message', [('MiT', 'expected LABEL=DIR'),
                                          ('MiT=/nowhere', 'ablation.json not found')])
def test_a_bad_pair_is_one_line(tmp_path, pair, message):
  code, _, stderr = combine(str(tmp_path / 'out'), [pair])
  assert code == 1 and len(stderr.splitlines()) == 1, stderr
  assert stderr.startswith('error: --combine: ') and message in stderr
