"""Segmentation metrics: confusion matrix (JAX) and the official scores (numpy).

Matches the official CEN evaluation (`semantic_segmentation/utils/meter.py` and
`main.py::validate`): only pixels whose ground truth is < num_classes count, so the
ignore label 255 drops out; pixel accuracy, mean class accuracy and mean IoU come from
the summed confusion matrix, with classes of zero denominator dropped by nanmean.
"""

from typing import Mapping

import jax.numpy as jnp
import numpy as np


# The main metric of each kind of output (key, label, larger is better): what a task's best
# checkpoint, progress line and ablation plot use; and the metrics an ablation table shows. A
# task names the kind of each of its outputs (`output_kind`).
MAIN_METRICS = {'semseg': ('miou', 'mIoU', True), 'depth': ('rmse', 'depth RMSE', False),
                'normals': ('mean', 'normals mean angle', False), 'image': ('l1', 'L1', False)}
TABLE_METRICS = {'semseg': ('miou',), 'image': ('l1', 'rmse', 'fid', 'kid'),
                 'depth': ('rmse', 'abs_rel', 'delta1'),
                 'normals': ('mean', 'median', 'within_11.25')}


def confusion_matrix(labels, preds, num_classes: int, ignore_label: int = 255):
  """int32 [K, K] counts: rows = ground truth, columns = prediction.

  Args:
    labels: integer ground truth, any shape.
    preds: integer predictions, the same shape as `labels`.
    num_classes: K; must be static under jit/pmap.
    ignore_label: dropped even if it is < K (the official code drops every label >= K).

  Exact integer counts (a fixed-length bincount), so it is safe to jit, pmap and sum
  across devices or batches.
  """
  k = int(num_classes)
  # int32 before the arithmetic: uint8 labels would overflow in gt * K.
  labels = jnp.asarray(labels).astype(jnp.int32).reshape(-1)
  preds = jnp.asarray(preds).astype(jnp.int32).reshape(-1)
  valid = (labels >= 0) & (labels < k) & (labels != ignore_label)
  # Argmax predictions are always in range; the check keeps stray values out of the
  # neighbouring cells (the official code likewise keeps only pred < K).
  valid &= (preds >= 0) & (preds < k)
  # Invalid pixels go to an extra overflow bin that is then cut off.
  index = jnp.where(valid, labels * k + preds, k * k)
  counts = jnp.bincount(index, length=k * k + 1)[:k * k]
  return counts.astype(jnp.int32).reshape(k, k)


def scores(conf) -> dict:
  """{'pixel_acc', 'mean_acc', 'miou'} in percent from a [K, K] confusion matrix.

  Classes with a zero denominator (absent from both ground truth and predictions for
  IoU; absent from the ground truth for accuracy) give nan and are skipped by nanmean,
  as in the official getScores. An all-zero matrix gives 0.0 for all three, as the
  official code does (and which keeps eval_results.json valid JSON).
  """
  conf = np.asarray(conf, np.float64)
  if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
    raise ValueError(f'expected a square [K, K] matrix, got shape {conf.shape}')
  total = conf.sum()
  if total == 0:
    return {'pixel_acc': 0.0, 'mean_acc': 0.0, 'miou': 0.0}
  diag = np.diag(conf)
  rows = conf.sum(1)  # ground-truth pixels per class
  cols = conf.sum(0)  # predicted pixels per class
  with np.errstate(divide='ignore', invalid='ignore'):
    per_class_acc = diag / rows
    iou = diag / (rows + cols - diag)
  # total > 0 means some row is non-empty, so neither nanmean sees only nans.
  return {'pixel_acc': float(diag.sum() / total * 100.0),
          'mean_acc': float(np.nanmean(per_class_acc) * 100.0),
          'miou': float(np.nanmean(iou) * 100.0)}


def scores_per_output(confs: Mapping[str, object]) -> dict:
  """{output name: scores(conf)} for e.g. {'rgb': ..., 'depth': ..., 'ensemble': ...}."""
  return {name: scores(conf) for name, conf in confs.items()}


# ----------------------------------------------------------------------------- depth, normals
# Sums that add up exactly over batches, devices and processes; the scores come from the sums.

DEPTH_SUMS = ('count', 'abs', 'squared', 'abs_rel', 'delta1')
NORMAL_ANGLE_BINS = 3600  # 0.05 degree bins on [0, 180]: the median to within 0.05 degrees
NORMAL_THRESHOLDS = (11.25, 22.5, 30.0)


def depth_sums(pred, target, valid):
  """[5] float32 sums over the valid pixels: count, |p - t|, (p - t)^2, |p - t| / t and the
  count with max(p / t, t / p) < 1.25 (p clamped to >= 1e-3 for the ratio)."""
  valid = valid.astype(jnp.float32)
  target = jnp.where(valid > 0, target, 1.0)
  err = pred - target
  ratio = jnp.maximum(pred, 1e-3) / target
  delta = (jnp.maximum(ratio, 1.0 / ratio) < 1.25).astype(jnp.float32)
  return jnp.stack([jnp.sum(valid), jnp.sum(valid * jnp.abs(err)), jnp.sum(valid * err ** 2),
                    jnp.sum(valid * jnp.abs(err) / target), jnp.sum(valid * delta)])


def depth_scores(sums) -> dict:
  """{'rmse', 'abs_rel', 'mae', 'delta1'} (metres; delta1 in percent) from `depth_sums`."""
  count, abs_err, squared, abs_rel, delta1 = (float(v) for v in np.asarray(sums, np.float64))
  if count == 0:
    return {'rmse': 0.0, 'abs_rel': 0.0, 'mae': 0.0, 'delta1': 0.0}
  return {'rmse': float(np.sqrt(squared / count)), 'abs_rel': abs_rel / count,
          'mae': abs_err / count, 'delta1': 100.0 * delta1 / count}


def angles_degrees(pred, target):
  """Angle between each predicted and target normal [..., 3] (pred need not be unit)."""
  pred = pred / jnp.maximum(jnp.linalg.norm(pred, axis=-1, keepdims=True), 1e-12)
  target = target / jnp.maximum(jnp.linalg.norm(target, axis=-1, keepdims=True), 1e-12)
  return jnp.degrees(jnp.arccos(jnp.clip(jnp.sum(pred * target, axis=-1), -1.0, 1.0)))


def normal_sums(pred, target, valid):
  """{'count', 'angle' (sum of degrees), 'within' [3] counts under NORMAL_THRESHOLDS,
  'histogram' [NORMAL_ANGLE_BINS] of angles} over the valid pixels."""
  angle = angles_degrees(pred, target)
  weight = valid.astype(jnp.float32)
  bins = jnp.clip((angle * (NORMAL_ANGLE_BINS / 180.0)).astype(jnp.int32), 0,
                  NORMAL_ANGLE_BINS - 1)
  histogram = jnp.zeros((NORMAL_ANGLE_BINS,), jnp.float32).at[bins.reshape(-1)].add(
      weight.reshape(-1))
  return {'count': jnp.sum(weight), 'angle': jnp.sum(weight * angle),
          'within': jnp.stack([jnp.sum(weight * (angle < t)) for t in NORMAL_THRESHOLDS]),
          'histogram': histogram}


def normal_scores(sums) -> dict:
  """{'mean', 'median' (degrees), 'within_11.25', 'within_22.5', 'within_30' (percent)}; the
  median is interpolated linearly inside its 0.05 degree histogram bin."""
  count = float(sums['count'])
  if count == 0:
    return {'mean': 0.0, 'median': 0.0, **{f'within_{t:g}': 0.0 for t in NORMAL_THRESHOLDS}}
  histogram = np.asarray(sums['histogram'], np.float64)
  cumulative = np.cumsum(histogram)
  half = 0.5 * cumulative[-1]
  b = int(np.searchsorted(cumulative, half))
  below = cumulative[b - 1] if b > 0 else 0.0
  width = 180.0 / NORMAL_ANGLE_BINS
  median = (b + (half - below) / max(histogram[b], 1e-12)) * width
  out = {'mean': float(sums['angle']) / count, 'median': float(median)}
  for t, n in zip(NORMAL_THRESHOLDS, np.asarray(sums['within'], np.float64)):
    out[f'within_{t:g}'] = 100.0 * float(n) / count
  return out
