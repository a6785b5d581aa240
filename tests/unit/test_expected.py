"""`--mode check`: a run's final figures against the config's expected mean ± std."""

import json

import ml_collections
import pytest

from cen_jax import expected


def results(step=2000, **metrics):
  return {'step': step, 'metrics': {k: dict(v) for k, v in metrics.items()}}


def test_band_is_three_standard_deviations_or_the_floor():
  assert expected.band(90.0, 0.4, 0.5) == pytest.approx((88.8, 91.2))
  assert expected.band(90.0, 0.1, 0.5) == pytest.approx((89.5, 90.5))  # seeds agreed closely


def test_compare_marks_each_figure():
  rows = expected.compare(results(ensemble={'miou': 92.0}, rgb={'miou': 89.0}),
                          [('ensemble', 'miou', 91.0, 0.2), ('rgb', 'miou', 90.0, 0.5)],
                          floor=0.5)
  assert [(r['low'], r['high'], r['inside']) for r in rows] == [
      pytest.approx((90.4, 91.6, False)), pytest.approx((88.5, 91.5, True))]
  with pytest.raises(ValueError, match='no depth/miou'):
    expected.compare(results(ensemble={'miou': 92.0}), [('depth', 'miou', 1.0, 0.1)], floor=0.5)


def config_expecting(*rows):
  config = ml_collections.ConfigDict()
  config.expected = tuple(rows)
  return config


def test_check_workdir(tmp_path):
  config = config_expecting(('ensemble', 'l1', 0.1381, 0.0010))
  with pytest.raises(FileNotFoundError, match='eval_results.json'):
    expected.check_workdir(config, str(tmp_path), num_steps=1500, digits=4)
  (tmp_path / 'eval_results.json').write_text(json.dumps(results(500, ensemble={'l1': 0.2})))
  with pytest.raises(ValueError, match='step 500.*step 1500'):
    expected.check_workdir(config, str(tmp_path), num_steps=1500, digits=4)
  (tmp_path / 'eval_results.json').write_text(json.dumps(results(1500, ensemble={'l1': 0.1420})))
  lines, inside = expected.check_workdir(config, str(tmp_path), num_steps=1500, digits=4)
  # floor 0.005 > 3 x 0.0010: the range is 0.1331-0.1431.
  assert inside and '0.1420' in lines[0] and '[0.1331, 0.1431]' in lines[0]
  (tmp_path / 'eval_results.json').write_text(json.dumps(results(1500, ensemble={'l1': 0.1440})))
  lines, inside = expected.check_workdir(config, str(tmp_path), num_steps=1500, digits=4)
  assert not inside and 'OUTSIDE' in lines[0]
  lines, inside = expected.check_workdir(config_expecting(), str(tmp_path), num_steps=1, digits=4)
  assert inside and 'no expected figures' in lines[0]
