"""Confusion matrix (JAX) against numpy, and scores against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import metrics


def reference_confusion(labels, preds, k):
  """The official rule in numpy: keep gt < K (and >= 0), rows = gt, cols = pred."""
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  preds = np.asarray(preds).reshape(-1).astype(np.int64)
  keep = (labels >= 0) & (labels < k)
  return np.bincount(labels[keep] * k + preds[keep], minlength=k * k).reshape(k, k)


def random_batch(seed, shape, k):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, size=shape)
  # Ignore pixels and labels >= K must both drop out.
  labels[rng.random(shape) < 0.2] = 255
  labels[rng.random(shape) < 0.1] = k + 3
  preds = rng.integers(0, k, size=shape)
  return labels.astype(np.int32), preds.astype(np.int32)


# ----------------------------------------------------------------------------- scores

def test_scores_hand_computed():
  # K = 4. Class 2 is absent from gt and preds (all nan -> skipped); class 3 appears only
  # in predictions (acc denominator 0 -> nan, skipped; IoU = 0 / 2 = 0, counted).
  conf = np.array([[3, 1, 0, 1],
                   [0, 4, 0, 1],
                   [0, 0, 0, 0],
                   [0, 0, 0, 0]])
  s = metrics.scores(conf)
  assert set(s) == {'pixel_acc', 'mean_acc', 'miou'}
  assert all(type(v) is float for v in s.values())
  # pixel acc = 7 / 10
  assert s['pixel_acc'] == pytest.approx(70.0)
  # class acc: 3/5, 4/5 -> mean 0.7
  assert s['mean_acc'] == pytest.approx(70.0)
  # IoU: c0 = 3 / (5 + 3 - 3) = 0.6, c1 = 4 / (5 + 5 - 4) = 2/3, c3 = 0 / (0 + 2 - 0) = 0
  assert s['miou'] == pytest.approx((0.6 + 2 / 3 + 0.0) / 3 * 100)


def test_scores_perfect_and_asymmetric():
  assert metrics.scores(np.diag([5, 0, 2])) == {'pixel_acc': 100.0, 'mean_acc': 100.0,
                                                'miou': 100.0}
  # rows are ground truth: class 0 has 4 gt pixels, 1 predicted as class 1.
  s = metrics.scores(np.array([[3, 1], [0, 2]]))
  assert s['pixel_acc'] == pytest.approx(5 / 6 * 100)
  assert s['mean_acc'] == pytest.approx((3 / 4 + 2 / 2) / 2 * 100)
  assert s['miou'] == pytest.approx((3 / 4 + 2 / 3) / 2 * 100)
  # The transpose swaps the roles: different mean accuracy, same IoU.
  t = metrics.scores(np.array([[3, 0], [1, 2]]))
  assert t['mean_acc'] == pytest.approx((3 / 3 + 2 / 3) / 2 * 100)
  assert t['miou'] == pytest.approx(s['miou'])


def test_scores_all_zero_matrix_is_zero():
  s = metrics.scores(np.zeros((3, 3), np.int64))
  assert s == {'pixel_acc': 0.0, 'mean_acc': 0.0, 'miou': 0.0}
  assert not any(math.isnan(v) for v in s.values())


def test_scores_rejects_non_square():
  with pytest.raises(ValueError):
    metrics.scores(np.zeros((2, 3)))


def test_scores_per_output():
  confs = {'rgb': np.array([[1, 1], [0, 2]]), 'ensemble': np.diag([2, 2])}
  out = metrics.scores_per_output(confs)
  assert list(out) == ['rgb', 'ensemble']
  assert out['ensemble']['miou'] == pytest.approx(100.0)
  assert out['rgb'] == metrics.scores(confs['rgb'])


# ----------------------------------------------------------------------------- confusion matrix

def test_confusion_matrix_small_exact():
  labels = np.array([[0, 1, 255], [2, 1, 7]])
  preds = np.array([[0, 2, 1], [2, 1, 0]])
  conf = np.asarray(metrics.confusion_matrix(labels, preds, 3))
  expected = np.zeros((3, 3), np.int64)
  expected[0, 0] = 1
  expected[1, 2] = 1
  expected[2, 2] = 1
  expected[1, 1] = 1
  np.testing.assert_array_equal(conf, expected)
  assert conf.dtype == np.int32


def test_confusion_matrix_uint8_labels():
  # 255 * K overflows uint8; the function must widen first.
  labels = np.array([255, 3, 1, 40], np.uint8)
  preds = np.array([1, 3, 1, 2], np.uint8)
  conf = np.asarray(metrics.confusion_matrix(labels, preds, 40))
  np.testing.assert_array_equal(conf, reference_confusion(labels, preds, 40))
  assert conf.sum() == 2


def test_confusion_matrix_ignore_label_below_k():
  labels = np.array([0, 1, 1, 2])
  preds = np.array([0, 1, 0, 2])
  conf = np.asarray(metrics.confusion_matrix(labels, preds, 3, ignore_label=1))
  np.testing.assert_array_equal(conf, np.diag([1, 0, 1]))


def test_confusion_matrix_drops_out_of_range_predictions():
  # Official `y < n`: a stray prediction K must not land in the next row's cell.
  labels = np.array([0, 0, 1, 2])
  preds = np.array([3, -1, 1, 2])
  conf = np.asarray(metrics.confusion_matrix(labels, preds, 3))
  np.testing.assert_array_equal(conf, np.diag([0, 1, 1]))


@pytest.mark.parametrize('shape', [(37,), (2, 17, 23), (3, 2, 8, 9)])
def test_confusion_matrix_matches_numpy_under_jit(shape):
  k = 7
  labels, preds = random_batch(0, shape, k)
  fn = jax.jit(metrics.confusion_matrix, static_argnums=(2,))
  conf = np.asarray(fn(labels, preds, k))
  expected = reference_confusion(labels, preds, k)
  np.testing.assert_array_equal(conf, expected)
  assert conf.shape == (k, k) and conf.dtype == np.int32
  assert conf.sum() < labels.size  # some pixels really were dropped


def test_confusion_matrix_under_pmap_summed():
  n = jax.local_device_count()
  assert n == 8, 'tests/conftest.py forces 8 host devices'
  k = 5
  labels, preds = random_batch(1, (n, 2, 16, 12), k)
  per_device = jax.pmap(lambda l, p: metrics.confusion_matrix(l, p, k))(labels, preds)
  psummed = jax.pmap(lambda l, p: jax.lax.psum(metrics.confusion_matrix(l, p, k), 'd'),
                     axis_name='d')(labels, preds)
  expected = reference_confusion(labels, preds, k)
  np.testing.assert_array_equal(np.asarray(per_device).sum(0), expected)
  np.testing.assert_array_equal(np.asarray(psummed)[0], expected)
  np.testing.assert_array_equal(np.asarray(psummed)[n - 1], expected)
  for d in range(n):
    np.testing.assert_array_equal(np.asarray(per_device)[d],
                                  reference_confusion(labels[d], preds[d], k))


def test_confusion_matrix_large_counts_are_exact():
  # float32 accumulation would lose counts past 2**24; bincount must not.
  k = 2
  labels = jnp.zeros((1 << 25,) , jnp.int32)
  preds = jnp.zeros((1 << 25,), jnp.int32).at[:3].set(1)
  conf = np.asarray(jax.jit(metrics.confusion_matrix, static_argnums=(2,))(labels, preds, k))
  np.testing.assert_array_equal(conf, [[(1 << 25) - 3, 3], [0, 0]])


def test_scores_of_random_matrix_match_official_formula():
  k = 6
  labels, preds = random_batch(2, (4, 30, 30), k)
  labels[labels == 4] = 255  # class 4 absent from gt, present in preds
  conf = np.asarray(metrics.confusion_matrix(labels, preds, k))
  s = metrics.scores(conf)
  diag = np.diag(conf).astype(float)
  with np.errstate(divide='ignore', invalid='ignore'):
    acc = diag / conf.sum(1)
    iou = diag / (conf.sum(1) + conf.sum(0) - diag)
  assert np.isnan(acc[4]) and iou[4] == 0.0
  assert s['mean_acc'] == pytest.approx(np.nanmean(acc) * 100)
  assert s['miou'] == pytest.approx(np.nanmean(iou) * 100)
  assert s['pixel_acc'] == pytest.approx(diag.sum() / conf.sum() * 100)
