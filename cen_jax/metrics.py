"""Segmentation metrics: confusion matrix (JAX) and the official scores (numpy).

Matches the official CEN evaluation (`semantic_segmentation/utils/meter.py` and
`main.py::validate`): only pixels whose ground truth is < num_classes count, so the
ignore label 255 drops out; pixel accuracy, mean class accuracy and mean IoU come from
the summed confusion matrix, with classes of zero denominator dropped by nanmean.
"""

from typing import Mapping

import jax.numpy as jnp
import numpy as np


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
