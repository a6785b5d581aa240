"""main.py end to end for translation on Mix Transformer branches (TokenFusion's generator and
discriminator) on the tiny synthetic domains: training logs the token statistics and the score
penalty, SIGKILL + resume is bit-identical (stochastic depth on), and summary prints the
official gen_b0 / dis_b0 parameter counts."""

import json
import os


from tests.e2e.test_end_to_end import (ROOT, check_kill_and_resume, run_main,
                                       trained_run_fixtures)
from tests.unit.test_mit_translation import OFFICIAL_DIS_PARAMS, OFFICIAL_GEN_PARAMS

CONFIG = os.path.join(ROOT, 'tests', 'helpers', 'configs', 'tiny_translation_mit.py')


data_dir, trained = trained_run_fixtures(CONFIG)


def test_sigkill_and_resume_is_bit_identical(tmp_path, trained, data_dir):
  check_kill_and_resume(CONFIG, trained, str(tmp_path / 'killed'), data_dir)
  lines = [json.loads(l) for l in open(os.path.join(trained, 'metrics.jsonl'))]
  for key in ('tokens_below_threshold/reshading', 'alpha/edge_texture', 'loss/l1_ensemble'):
    assert key in lines[0], key
  assert lines[0]['loss/slim'] > 0  # the sum of the token scores
  with open(os.path.join(trained, 'eval_results.json')) as f:
    assert set(json.load(f)['metrics']) == {'reshading', 'edge_texture', 'ensemble'}


def test_summary_prints_the_official_counts(data_dir):
  config = os.path.join(ROOT, 'configs', 'taskonomy_tokenfusion_mit.py')
  out = run_main(f'--config={config}:b0', '--mode=summary', data_dir=data_dir).stdout
  assert 'MiT generator gen_b0, discriminator dis_b0' in out
  assert f'params: {OFFICIAL_GEN_PARAMS["b0"]}' in out
  assert f'discriminator params: {OFFICIAL_DIS_PARAMS["b0"]}' in out
