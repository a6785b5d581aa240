"""main.py end to end with a MiT backbone (TokenFusion, AdamW) on the tiny synthetic scenes:
SIGKILL + resume is bit-identical, and --mode export / import round-trips the official
TokenFusion checkpoint (as .npz, numpy only) to the same evaluation."""

import json
import os

import numpy as np

from tests.e2e.test_end_to_end import (ROOT, check_kill_and_resume, run_main,
                                       trained_run_fixtures)

CONFIG = os.path.join(ROOT, 'tests', 'helpers', 'configs', 'tiny_synthetic_mit.py')


data_dir, trained = trained_run_fixtures(CONFIG)


def test_sigkill_and_resume_is_bit_identical(tmp_path, trained, data_dir):
  check_kill_and_resume(CONFIG, trained, str(tmp_path / 'killed'), data_dir)
  lines = [json.loads(l) for l in open(os.path.join(trained, 'metrics.jsonl'))]
  assert 'tokens_below_threshold/rgb' in lines[0] and lines[0]['loss/l1'] > 0


def test_export_import_round_trip_evaluates_the_same(tmp_path, trained, data_dir):
  first, second = str(tmp_path / 'a.npz'), str(tmp_path / 'b.npz')
  imported = str(tmp_path / 'imported')
  run_main(f'--config={CONFIG}', f'--workdir={trained}', '--mode=export', '--checkpoint=8',
           f'--output={first}', data_dir=data_dir)
  with np.load(first) as exported:
    assert 'module.encoder.score_predictor.0.score_nets.1.7.weight' in exported.files
    assert exported['module.encoder.block1.0.norm2.ln_1.weight'].shape == (8,)
  run_main(f'--config={CONFIG}', f'--workdir={imported}', '--mode=import',
           f'--torch_checkpoint={first}', data_dir=data_dir)
  run_main(f'--config={CONFIG}', f'--workdir={imported}', '--mode=export', '--checkpoint=0',
           f'--output={second}', data_dir=data_dir)
  with np.load(first) as a, np.load(second) as b:
    assert a.files == b.files
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  run_main(f'--config={CONFIG}', f'--workdir={imported}', '--mode=eval', '--checkpoint=0',
           data_dir=data_dir)
  with open(os.path.join(trained, 'eval_results.json')) as f:
    during = json.load(f)['metrics']
  with open(os.path.join(imported, 'eval_results.json')) as f:
    assert json.load(f)['metrics'] == during


def test_a_fusion_that_does_not_fit_is_one_line(data_dir):
  proc = run_main(f'--config={CONFIG}', '--mode=summary', '--config.model.fusion=average',
                  data_dir=data_dir, check=False)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: config.model.fusion='average' does not "
                                                 "fit config.model.backbone='mit_b0'")
