"""Checkpoints written before the package was restructured (tests/fixtures/checkpoints_v0: the
tiny segmentation and translation runs at step 8, and the evaluation their run logged) restore
with today's code, and evaluate to the figures that run logged."""

import json
import os
import shutil

import pytest

from tests.e2e.test_end_to_end import ROOT, run_main

FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'checkpoints_v0')
CONFIGS = {'segmentation': 'tiny_synthetic.py', 'translation': 'tiny_translation.py'}


@pytest.mark.parametrize('task', sorted(CONFIGS))
def test_old_checkpoint_restores_and_evaluates_to_the_logged_figures(task, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(os.path.join(FIXTURES, task, 'checkpoints'), workdir / 'checkpoints')
  config = os.path.join(ROOT, 'tests', 'helpers', 'configs', CONFIGS[task])
  run_main(f'--config={config}', f'--workdir={workdir}', '--mode=eval', '--checkpoint=8',
           data_dir=str(tmp_path / 'tfds'))
  with open(os.path.join(FIXTURES, task, 'eval_results.json')) as f:
    logged = json.load(f)
  with open(workdir / 'eval_results.json') as f:
    now = json.load(f)
  assert now['step'] == logged['step'] == 8
  assert set(now['metrics']) == set(logged['metrics'])
  for output, scores in logged['metrics'].items():
    assert set(now['metrics'][output]) == set(scores)
    for metric, value in scores.items():
      assert now['metrics'][output][metric] == pytest.approx(value, rel=1e-6, abs=1e-9), (
          output, metric)
