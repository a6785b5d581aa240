"""The ablation runner (python -m cen_jax.ablate) and the norm-scale analysis (main.py --mode
scales) on the tiny synthetic config: the table holds the runs' own eval results, finished
runs are not trained again, and the per-layer fractions equal a hand count on the checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np

from tests.e2e.test_end_to_end import final_params, run_main
from tests.helpers.env import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'tests', 'helpers', 'configs', 'tiny_synthetic.py')


def test_ablation_table_and_scales(tmp_path):
  workdir, data_dir = str(tmp_path / 'ablate'), str(tmp_path / 'tfds')
  args = ['-m', 'cen_jax.ablate', f'--config={CONFIG}', f'--workdir={workdir}',
          '--fusions=cen,none,diverge', '--seeds=2', '--config.train.stage_epochs=(1,1)',
          f'--config.model.fusion_module={ROOT}/tests/helpers/configs/diverging_fusion.py']
  env = child_env()
  cmd = [sys.executable, *args, f'--config.data.data_dir={data_dir}']
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = open(os.path.join(workdir, 'ablation.md')).read().splitlines()
  rows = {line.split(' | ')[0].strip('| `'): line for line in table if line.startswith('| `')}
  assert set(rows) == {'cen', 'none', 'diverge'}
  # A run stopped by a non-finite loss is reported as diverged, not as a result.
  assert rows['diverge'].startswith('| `diverge` | 0 (+2 diverged) | – |')
  for k in range(2):
    assert os.path.exists(os.path.join(workdir, 'diverge', f'seed{k}', 'diverged.json'))
  rows.pop('diverge')
  assert os.path.getsize(os.path.join(workdir, 'ablation.png')) > 1000
  for fusion in rows:
    results = [json.load(open(os.path.join(workdir, fusion, f'seed{k}', 'eval_results.json')))
               for k in range(2)]
    assert all(r['step'] == 4 for r in results)
    ens = np.array([r['metrics']['ensemble']['miou'] for r in results])
    assert f'{ens.mean():.2f} ± {ens.std():.2f}' in rows[fusion]
  seeds = [json.load(open(os.path.join(workdir, 'cen', f'seed{k}', 'eval_results.json')))
           for k in range(2)]
  assert seeds[0] != seeds[1]  # different seeds, different runs
  # Finished runs are reused: a second call trains nothing.
  stamp = os.path.getmtime(os.path.join(workdir, 'none', 'seed0', 'eval_results.json'))
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0 and 'ablate: training' not in again.stdout
  assert os.path.getmtime(os.path.join(workdir, 'none', 'seed0', 'eval_results.json')) == stamp

  # --mode scales on the CEN run: fractions per layer counted by hand from the checkpoint.
  run = os.path.join(workdir, 'cen', 'seed0')
  step, state = final_params(run)
  out = run_main(f'--config={CONFIG}', f'--workdir={run}', '--mode=scales',
                 f'--checkpoint={step}', '--config.train.stage_epochs=(1,1)',
                 '--config.model.threshold=0.9', data_dir=data_dir)
  printed = {line.split()[0]: [float(v) for v in line.split()[1:]]
             for line in out.stdout.splitlines() if line.strip().startswith('layer')
             and not line.strip().startswith('layer ')}
  encoder = state['params']['encoder']
  blocks = sorted(k for k in encoder if k.startswith('layer'))
  assert sorted(printed) == blocks
  for block in blocks:
    scale = np.abs(encoder[block]['bn2']['scale'])  # [2, C]
    half = scale.shape[1] // 2
    expected = [(scale[0, :half] < 0.9).mean(), (scale[1, half:] < 0.9).mean()]
    np.testing.assert_allclose(printed[block], expected, atol=5e-4)
  assert os.path.getsize(os.path.join(run, 'norm_scales.png')) > 1000
