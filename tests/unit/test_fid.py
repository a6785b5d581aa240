"""FID and KID (cen_jax.fid) against the official fid_kid.py formulas in NumPy/SciPy, hand cases
for the network's pieces, the folder comparison (main.py --mode fid) and FID/KID inside the
translation evaluation (one device = eight devices; real features cached).

The references below follow the official `image2image_translation/utils/fid_kid.py`
(np.cov statistics, `calculate_frechet_distance`, `polynomial_mmd_averages` with sklearn's
polynomial_kernel written out, global np.random.choice subsets) as independent NumPy code.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import linalg

from cen_jax import fid
from tests.helpers import data_fixtures
from tests.e2e.test_end_to_end import one_error_line, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'tests', 'helpers', 'configs', 'tiny_translation.py')


# ----------------------------------------------------------------------------- references

def _sqrtm(a):
  out = linalg.sqrtm(a)
  return out[0] if isinstance(out, tuple) else out


def official_fid(act1, act2, eps=1e-6):
  mu1, sigma1 = np.mean(act1, axis=0), np.cov(act1, rowvar=False)
  mu2, sigma2 = np.mean(act2, axis=0), np.cov(act2, rowvar=False)
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    covmean = covmean.real
  return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def sklearn_polynomial_kernel(x, y, degree=3, gamma=None, coef0=1):
  gamma = 1.0 / x.shape[1] if gamma is None else gamma
  k = x @ y.T
  k *= gamma
  k += coef0
  k **= degree
  return k


def official_unbiased_mmd2(k_xx, k_xy, k_yy):
  m = k_xx.shape[0]
  diag_x, diag_y = np.diagonal(k_xx), np.diagonal(k_yy)
  kt_xx_sum = (k_xx.sum(axis=1) - diag_x).sum()
  kt_yy_sum = (k_yy.sum(axis=1) - diag_y).sum()
  k_xy_sum = k_xy.sum(axis=0).sum()
  mmd2 = (kt_xx_sum + kt_yy_sum) / (m * (m - 1))
  mmd2 -= 2 * k_xy_sum / (m * m)
  return mmd2


def official_kid(codes_g, codes_r, n_subsets=50, subset_size=1000):
  """x100 mean; subsets from the global np.random as the official (caller seeds it)."""
  mmds = np.zeros(n_subsets)
  subset_size = min(subset_size, len(codes_g), len(codes_r))
  for i in range(n_subsets):
    g = codes_g[np.random.choice(len(codes_g), subset_size, replace=False)]
    r = codes_r[np.random.choice(len(codes_r), subset_size, replace=False)]
    mmds[i] = official_unbiased_mmd2(sklearn_polynomial_kernel(g, g),
                                     sklearn_polynomial_kernel(g, r),
                                     sklearn_polynomial_kernel(r, r))
  return mmds.mean() * 100


def _features(n, d, seed, shift=0.0):
  """Non-negative, correlated features like pool3 ReLU averages."""
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return np.abs(rng.normal(size=(n, d)) @ mix + shift).astype(np.float32)


def _streamed(feats, batch=7):
  stats = fid.empty_stats(feats.shape[1])
  for start in range(0, len(feats), batch):
    stats = fid.add_features(stats, feats[start:start + batch])
  return stats


# ----------------------------------------------------------------------------- formulas

@pytest.mark.parametrize('n1, n2, d', [(300, 260, 64),  # full-rank covariances
                                       (40, 33, 256)])  # n < d: singular, near-singular product
def test_fid_from_streamed_stats_equals_official(n1, n2, d):
  a, b = _features(n1, d, 0), _features(n2, d, 1, shift=0.3)
  expected = official_fid(a.astype(np.float64), b.astype(np.float64))
  got = fid.fid_from_stats(_streamed(a), _streamed(b))
  print(f'n {n1}/{n2} d {d}: fid {got:.6f} official {expected:.6f} '
        f'rel diff {abs(got - expected) / expected:.1e}')
  assert abs(got - expected) <= 1e-6 * abs(expected)


def test_fid_eps_fallback_matches_official(monkeypatch):
  """A non-finite sqrt(S1 S2) is retried with eps on both diagonals, as the official."""
  a, b = _features(30, 48, 2), _features(30, 48, 3, shift=0.1)
  calls = []
  real_sqrtm = linalg.sqrtm

  def sqrtm_failing_first(x, *args, **kwargs):
    calls.append(x)
    return np.full_like(x, np.nan) if len(calls) == 1 else real_sqrtm(x, *args, **kwargs)

  mu1, s1 = fid.mean_and_covariance(fid.stats_of(a))
  mu2, s2 = fid.mean_and_covariance(fid.stats_of(b))
  monkeypatch.setattr(linalg, 'sqrtm', sqrtm_failing_first)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  assert len(calls) == 2
  offset = np.eye(48) * 1e-6
  np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
  monkeypatch.undo()
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(_sqrtm((s1 + offset) @ (s2 + offset)).real))
  np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_fid_hand_case_diagonal_gaussians():
  """Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2."""
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  v1, v2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
  got = fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  np.testing.assert_allclose(got, 5.0 + 1.0 + 1.0 + 0.0, rtol=1e-12)


def test_covariance_equals_np_cov():
  a = _features(50, 16, 4, shift=2.0)
  mu, sigma = fid.mean_and_covariance(_streamed(a))
  np.testing.assert_allclose(mu, a.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(a.astype(np.float64), rowvar=False), rtol=1e-9,
                             atol=1e-12)


@pytest.mark.parametrize('n_g, n_r, subset_size', [(40, 35, 1000), (60, 50, 20)])
def test_kid_equals_official_with_the_same_subsets(n_g, n_r, subset_size):
  g, r = _features(n_g, 32, 5), _features(n_r, 32, 6, shift=0.2)
  np.random.seed(7)
  expected = official_kid(g.astype(np.float64), r.astype(np.float64), subset_size=subset_size)
  got = fid.kid(g, r, seed=7, subset_size=subset_size)
  print(f'kid {got!r} official {expected!r}')
  assert got == expected  # same subsets, same arithmetic: bit-identical
  assert fid.kid(g, r, seed=8, subset_size=subset_size) != got or subset_size >= n_r


def test_kid_hand_case():
  """Two points per set, d = 1: k(x, y) = (xy + 1)^3; unbiased MMD^2 =
  2 k(x1, x2) / 2 + 2 k(y1, y2) / 2 - 2 * sum k(x, y) / 4."""
  x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [1.0]])
  k = lambda a, b: (a * b + 1) ** 3
  expected = k(0, 1) + k(2, 1) - (k(0, 2) + k(0, 1) + k(1, 2) + k(1, 1)) / 2
  assert fid.kid(x, y, n_subsets=3) == pytest.approx(100 * expected, rel=1e-12)


# ----------------------------------------------------------------------------- network pieces

def test_bilinear_matrix_hand_case():
  """F.interpolate 2 -> 4 (align_corners=False): sources -0.25 (clamped), 0.25, 0.75, 1.25."""
  np.testing.assert_allclose(fid.bilinear_matrix(2, 4),
                             [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
  np.testing.assert_array_equal(fid.bilinear_matrix(5, 5), np.eye(5))
  rows = fid.bilinear_matrix(7, 3)  # 7 -> 3: sources 2/3, 3 + 1/6 ... rows sum to 1
  np.testing.assert_allclose(rows.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(rows[0, :2], [1 / 3, 2 / 3], rtol=1e-6)


def test_avg_pool_ignores_padding():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  pooled = np.asarray(fid.avg_pool_excluding_padding(x))[0, :, :, 0]
  assert pooled[0, 0] == np.mean([0, 1, 4, 5])
  assert pooled[1, 1] == np.mean([0, 1, 2, 4, 5, 6, 8, 9, 10])
  assert pooled[0, 3] == np.mean([2, 3, 6, 7])


def test_stretch_equals_official_png_conversion():
  """The official's saved image: ((x - min) * 255 / (max - min)).astype(uint8), read / 255."""
  images = np.random.default_rng(0).uniform(-0.7, 0.9, (3, 8, 9, 3)).astype(np.float32)
  expected = np.stack([((i - i.min()) * 255 / (i.max() - i.min())).astype(np.uint8)
                       for i in images])
  got = np.asarray(fid.stretch_to_unit_range(images))
  np.testing.assert_array_equal(np.round(got * 255).astype(np.uint8), expected)  # same levels
  np.testing.assert_allclose(got, expected / 255, rtol=1e-6)
  assert np.all(np.asarray(fid.stretch_to_unit_range(np.ones((1, 4, 4, 3)))) == 0)


# ----------------------------------------------------------------------------- folders, main.py

@pytest.fixture(scope='module')
def weights_npz(tmp_path_factory):
  """Random weights in pytorch-fid's state_dict layout, as the converted .npz."""
  path = str(tmp_path_factory.mktemp('inception') / 'pt_inception-random.npz')
  np.savez(path, **fid.export_state_dict(fid.random_variables(seed=1)))
  return path


def _write_images(folder, seed, n, size=(24, 20)):
  os.makedirs(folder)
  rng = np.random.default_rng(seed)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(
        os.path.join(folder, f'{i:03d}.png'))


def test_compare_folders_and_main_fid_mode(tmp_path, weights_npz):
  """main.py --mode fid prints the official formulas' FID and KID on the folders' features."""
  dir_a, dir_b = str(tmp_path / 'a'), str(tmp_path / 'b')
  _write_images(dir_a, 0, 3)
  _write_images(dir_b, 1, 4)
  variables = fid.load_weights(weights_npz)
  forward = jax.jit(fid.features)
  feats = [np.concatenate([np.asarray(forward(variables, fid.read_unit_image(f)[None]))
                           for f in fid.list_images(d)]) for d in (dir_a, dir_b)]
  np.random.seed(0)
  expected = {'fid': official_fid(*[f.astype(np.float64) for f in feats]),
              'kid': official_kid(*[f.astype(np.float64) for f in feats])}
  # The command line: no --config (configs/fid.py supplies config.eval).
  out = run_main('--mode=fid', f'--inputs={dir_a}', f'--inputs={dir_b}',
                 f'--config.eval.inception_weights={weights_npz}', data_dir=str(tmp_path)).stdout
  printed = dict(line.split(': ') for line in out.strip().splitlines()[-2:])
  print(f'main.py --mode fid: {printed}; official formulas: {expected}')
  assert float(printed['fid']) == pytest.approx(expected['fid'], rel=1e-4, abs=1e-4)
  assert float(printed['kid']) == pytest.approx(expected['kid'], rel=1e-4, abs=1e-4)


def test_fid_mode_errors_are_one_line(tmp_path, weights_npz):
  folder = str(tmp_path / 'a')
  _write_images(folder, 0, 2, size=(8, 8))
  missing = str(tmp_path / 'nope.pth')
  line = one_error_line(run_main(f'--config={CONFIG}', '--mode=fid', f'--inputs={folder}',
                                 f'--inputs={folder}', f'--config.eval.inception_weights={missing}',
                                 data_dir=str(tmp_path), check=False))
  assert missing in line and 'does not exist' in line
  line = one_error_line(run_main('--mode', 'fid', f'--inputs={folder}', f'--inputs={folder}',
                                 data_dir=str(tmp_path), check=False))
  assert 'inception_weights' in line
  bad = str(tmp_path / 'other.npz')
  np.savez(bad, **{'conv.weight': np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match='not the pytorch-fid FID InceptionV3'):
    fid.load_weights(bad)


# ----------------------------------------------------------------------------- evaluation

@pytest.fixture(scope='module')
def tiny_setup(tmp_path_factory):
  from cen_jax import train
  from cen_jax.tasks import translation
  from tests.helpers.configs import tiny_translation
  config = tiny_translation.get_config()
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  config.model.test_dropout = False  # outputs independent of how batches are split
  model = train.build(config)
  state = train.create_state(config, model, jax.random.key(0))
  return config, model, translation.eval_variables(state)


def _evaluate(config, model, variables, workdir, num_devices, monkeypatch):
  """translation.evaluate on `num_devices` local devices; returns the results and the
  (mu, sigma) pairs each FID was computed from (the 2048-d sqrtm itself, ~30 s per output on
  this CPU, is replaced by a cheap stand-in here: its formula is checked above)."""
  from cen_jax.tasks import translation
  devices = jax.local_devices()[:num_devices]
  recorded = []

  def record(mu1, sigma1, mu2, sigma2, eps=1e-6):
    recorded.append((mu1, sigma1, mu2, sigma2))
    return float(np.sum((mu1 - mu2) ** 2))

  with monkeypatch.context() as m:
    m.setattr(jax, 'local_devices', lambda *a, **k: devices)
    m.setattr(fid, 'INPUT_SIZE', 75)  # Inception's smallest input: CPU-fast (parity: 299)
    m.setattr(fid, 'frechet_distance', record)
    results = translation.evaluate(config, model, variables, split='test', step=1,
                                   workdir=str(workdir))
  return results, recorded


def _reference_features(config, model, variables, inception):
  """Features of every output and target, image by image, outside the evaluation."""
  from cen_jax.tasks import translation
  forward = jax.jit(lambda x: fid.features(
      inception, fid.stretch_to_unit_range(x, quantize=config.eval.fid_8bit), input_size=75))
  outputs, targets = [], []
  for index, batch in enumerate(data_fixtures.eval_iterator(config, 'test', batch_size=2)):
    x = np.stack([batch[n] for n in config.modalities])
    out = translation.generate(variables, x, translation.eval_key(config, index), model=model,
                               config=config)
    valid = np.asarray(batch['valid'], bool)
    outputs.append(np.asarray(out)[:, valid])
    targets.append(np.asarray(batch['target'])[valid])
  outputs, targets = np.concatenate(outputs, 1), np.concatenate(targets)
  feats = lambda images: np.concatenate([np.asarray(forward(i[None])) for i in images])
  return [feats(o) for o in outputs], feats(targets)


def _stats_diff(a, b) -> float:
  """Largest difference of (mu, sigma, mu, sigma) relative to each array's max magnitude."""
  return max(float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(a, b))


@pytest.mark.parametrize('fid_8bit', [False, True])
def test_evaluation_fid_kid_on_one_and_eight_devices(tiny_setup, weights_npz, tmp_path,
                                                     monkeypatch, fid_8bit):
  """Evaluation on 1 and on 8 devices feeds the FID formula the same statistics and gives the
  same KID; they match the official formulas on features computed image by image outside the
  evaluation; the real features are cached and reused.

  The 1- and 8-device programs (and the reference) are compiled differently, so generator
  outputs differ by float32 rounding. Without the 8-bit truncation that stays ~1e-5 relative in
  the statistics; with it, a pixel can cross an 8-bit level of the official stretch, which moves
  the features of these 4 random-weight images by up to ~1e-3 (tolerance 1e-2)."""
  from cen_jax.tasks import translation
  config, model, variables = tiny_setup
  config = config.copy_and_resolve_references()
  config.eval.inception_weights = weights_npz
  config.eval.fid_8bit = fid_8bit
  tolerance = 1e-2 if fid_8bit else 1e-4
  one, one_stats = _evaluate(config, model, variables, tmp_path / 'one', 1, monkeypatch)
  eight, eight_stats = _evaluate(config, model, variables, tmp_path / 'eight', 8, monkeypatch)
  names = translation.output_names(config)
  assert len(one_stats) == len(eight_stats) == len(names)
  generated, real = _reference_features(config, model, variables, fid.load_weights(weights_npz))
  real_stats = (real.astype(np.float64).mean(0), np.cov(real.astype(np.float64), rowvar=False))
  for o, name in enumerate(names):
    g = generated[o].astype(np.float64)
    np.random.seed(config.seed)
    reference_kid = official_kid(g, real.astype(np.float64))
    kid1, kid8 = one['metrics'][name]['kid'], eight['metrics'][name]['kid']
    diffs = {'stats 1 vs 8': _stats_diff(eight_stats[o], one_stats[o]),
             'kid 1 vs 8': abs(kid8 - kid1) / abs(kid1),
             'real stats vs ref': _stats_diff(eight_stats[o][2:], real_stats),
             'stats vs ref': _stats_diff(eight_stats[o], (g.mean(0), np.cov(g, rowvar=False))
                                         + real_stats),
             'kid vs ref': abs(kid8 - reference_kid) / abs(reference_kid)}
    print(f'fid_8bit={fid_8bit} {name}', {k: f'{v:.1e}' for k, v in diffs.items()})
    assert eight['metrics'][name]['l1'] == pytest.approx(one['metrics'][name]['l1'], rel=1e-6)
    assert diffs['real stats vs ref'] < 1e-4  # targets: no generator in between
    assert max(diffs.values()) < tolerance
  with open(tmp_path / 'eight' / 'eval_results.json') as f:
    assert set(json.load(f)['metrics']['ensemble']) == {'l1', 'rmse', 'fid', 'kid'}
  if fid_8bit:
    return
  # The real features are cached; the next evaluation runs Inception on the outputs only.
  assert os.listdir(tmp_path / 'eight' / 'fid_real') == ['synthetic_domains-tiny-rgb-test-32.npz']
  monkeypatch.setattr(translation, 'save_real_features',
                      lambda *a: pytest.fail('real features recomputed'))
  again, again_stats = _evaluate(config, model, variables, tmp_path / 'eight', 8, monkeypatch)
  for name in names:
    for key, value in eight['metrics'][name].items():
      assert again['metrics'][name][key] == pytest.approx(value, rel=1e-12)
  assert _stats_diff(again_stats[-1], eight_stats[-1]) < 1e-12


def test_evaluation_without_weights_skips_with_one_line(tiny_setup, tmp_path, capsys):
  from cen_jax.tasks import translation
  config, model, variables = tiny_setup
  results = translation.evaluate(config, model, variables, split='test', step=1,
                                 workdir=str(tmp_path))
  assert set(results['metrics']['ensemble']) == {'l1', 'rmse'}
  lines = [l for l in capsys.readouterr().err.splitlines() if 'fid/kid' in l]
  assert len(lines) == 1 and 'config.eval.inception_weights is not set' in lines[0]
