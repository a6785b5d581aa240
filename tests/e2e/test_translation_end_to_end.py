"""main.py end to end for translation on the tiny synthetic domains: train/eval outputs,
SIGKILL + resume bit-identical (dropout on), predict with --save_logits, summary."""

import json
import os

import numpy as np
from PIL import Image

from tests.e2e.test_end_to_end import (check_kill_and_resume, one_error_line, run_main,
                                       trained_run_fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'tests', 'helpers', 'configs', 'tiny_translation.py')


data_dir, trained = trained_run_fixtures(CONFIG)


def test_train_writes_results_logs_and_previews(trained):
  with open(os.path.join(trained, 'eval_results.json')) as f:
    results = json.load(f)
  assert results['step'] == 8 and results['split'] == 'test'
  assert set(results['metrics']) == {'reshading', 'edge_texture', 'ensemble'}
  for scores in results['metrics'].values():
    assert set(scores) == {'l1', 'rmse'}
    assert 0.0 < scores['l1'] <= scores['rmse'] <= 2.0  # RMSE >= mean |error| (Jensen)
  lines = [json.loads(l) for l in open(os.path.join(trained, 'metrics.jsonl'))]
  steps = [l['step'] for l in lines if 'loss/total' in l]
  assert steps == list(range(1, 9))
  for key in ('loss/discriminator', 'loss/g_adversarial', 'loss/l1_ensemble', 'loss/slim',
              'alpha/reshading', 'scales_below_threshold/edge_texture'):
    assert key in lines[0], key
  assert any('eval/ensemble/l1' in l for l in lines)
  previews = os.listdir(os.path.join(trained, 'previews'))
  assert 'step_0000004.png' in previews and 'step_0000008.png' in previews


def test_eval_mode_reproduces_training_eval(trained, data_dir):
  with open(os.path.join(trained, 'eval_results.json')) as f:
    during = json.load(f)
  out = run_main(f'--config={CONFIG}', f'--workdir={trained}', '--mode=eval', '--checkpoint=8',
                 data_dir=data_dir).stdout
  with open(os.path.join(trained, 'eval_results.json')) as f:
    after = json.load(f)
  assert after == during
  assert 'ensemble' in out and 'l1' in out


def test_sigkill_and_resume_is_bit_identical(tmp_path, trained, data_dir):
  check_kill_and_resume(CONFIG, trained, str(tmp_path / 'killed'), data_dir)


def test_summary_counts_both_networks(data_dir):
  out = run_main(f'--config={CONFIG}', '--mode=summary', data_dir=data_dir).stdout
  import jax
  from cen_jax import models, train
  from tests.helpers.configs import tiny_translation
  config = tiny_translation.get_config()
  model = train.build(config)
  shapes = jax.eval_shape(lambda: train.init_variables(config, model, jax.random.key(0)))
  assert f'params: {models.count_params(shapes["params"]["generator"])}' in out
  assert f'discriminator params: {models.count_params(shapes["params"]["discriminator"])}' in out
  assert 'gflops:' in out


def test_predict_writes_images_and_raw_outputs(trained, data_dir, tmp_path):
  rng = np.random.RandomState(0)
  inputs = []
  for name in ('reshading', 'edge_texture'):
    path = str(tmp_path / f'{name}.png')
    Image.fromarray(rng.randint(0, 256, (20, 24, 3), np.uint8)).save(path)
    inputs.append(f'--inputs={path}')
  out_dir = str(tmp_path / 'out')
  run_main(f'--config={CONFIG}', f'--workdir={trained}', '--mode=predict', *inputs,
           f'--output={out_dir}', '--save_logits', data_dir=data_dir)
  files = sorted(os.listdir(out_dir))
  for name in ('reshading', 'edge_texture', 'ensemble'):
    raw = np.load(os.path.join(out_dir, f'reshading_{name}.npy'))
    assert raw.shape == (32, 32, 3) and raw.dtype == np.float32
    assert np.abs(raw).max() <= 1.0
    image = np.asarray(Image.open(os.path.join(out_dir, f'reshading_{name}.png')))
    assert image.shape == (32, 32, 3)
    np.testing.assert_array_equal(image, np.clip(np.round((raw.astype(np.float64) + 1) * 127.5),
                                                 0, 255).astype(np.uint8))
  assert files


def test_target_among_inputs_is_one_line(data_dir):
  line = one_error_line(run_main(f'--config={CONFIG}', '--mode=summary',
                                 '--config.data.target=reshading', data_dir=data_dir,
                                 check=False))
  assert 'config.data.target' in line
