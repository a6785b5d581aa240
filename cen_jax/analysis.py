"""Norm-scale analysis of a trained workdir (`python main.py --mode scales`): how many of the
penalised scales each branch has driven under the exchange threshold, over training (from the
logged `scales_below_threshold/<branch>` of metrics.jsonl) and per layer (from a checkpoint),
and the |scale| histograms of the penalised and the free channels of every branch, as the
paper's figures of the BN scaling factors."""

import numpy as np

from cen_jax.fusion import ops
from cen_jax import run_log as log_lib


def layer_fractions(named_scales, threshold: float) -> tuple[list, np.ndarray]:
  """(layer names, [L, M] fraction of branch m's penalised scales with |scale| < threshold)."""
  names, rows = [], []
  for name, scales in named_scales:
    scales = np.abs(np.asarray(scales, np.float64))
    mask = ops.sparsity_masks(*scales.shape)
    rows.append([(scales[m][mask[m]] < threshold).mean() if mask[m].any() else 0.0
                 for m in range(scales.shape[0])])
    names.append(name)
  return names, np.asarray(rows, np.float64).reshape(len(names), -1)


def logged_fractions(workdir: str, branches) -> tuple[np.ndarray, np.ndarray]:
  """(steps [T], fractions [T, M]) of `scales_below_threshold/<branch>` in metrics.jsonl."""
  keys = [f'scales_below_threshold/{b}' for b in branches]
  steps, rows = [], []
  for record in log_lib.read_metrics(workdir):
    if all(k in record for k in keys):
      steps.append(record['step'])
      rows.append([record[k] for k in keys])
  return np.asarray(steps), np.asarray(rows, np.float64).reshape(len(steps), len(keys))


def scale_figure(named_scales, branches, threshold: float, history, step: int, path: str):
  """Writes the three-panel figure: fraction under the threshold over training, per layer at
  `step`, and |scale| histograms (penalised vs free channels) per branch."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from cen_jax import viz
  names, fractions = layer_fractions(named_scales, threshold)
  fig, axes = plt.subplots(1, 2 + len(branches), figsize=(5 * (2 + len(branches)), 4))
  steps, logged = history
  for m, branch in enumerate(branches):
    if len(steps):
      axes[0].plot(steps, logged[:, m], label=branch)
  axes[0].set(title='penalised scales under threshold', xlabel='step', ylabel='fraction',
              ylim=(-0.02, 1.02))
  width = 0.8 / max(len(branches), 1)
  for m, branch in enumerate(branches):
    axes[1].bar(np.arange(len(names)) + m * width, fractions[:, m], width, label=branch)
  axes[1].set(title=f'per layer at step {step}', ylabel='fraction', ylim=(0, 1.02))
  axes[1].set_xticks(np.arange(len(names)) + 0.4 - width / 2)
  axes[1].set_xticklabels(names, rotation=90, fontsize=6)
  for m, branch in enumerate(branches):
    ax = axes[2 + m]
    scales = [np.abs(np.asarray(s, np.float64)) for _, s in named_scales]
    masks = [ops.sparsity_masks(*s.shape) for s in scales]
    penalised = np.concatenate([s[m][k[m]] for s, k in zip(scales, masks)])
    free = np.concatenate([s[m][~k[m]] for s, k in zip(scales, masks)])
    bins = np.logspace(np.log10(max(min(penalised.min(initial=1), free.min(initial=1)), 1e-8)),
                       np.log10(max(penalised.max(initial=1), free.max(initial=1)) * 1.01), 40)
    ax.hist([penalised, free], bins=bins, label=['penalised', 'free'], stacked=False)
    ax.axvline(threshold, color='k', linestyle='--', linewidth=1)
    ax.set(xscale='log', title=f'|scale| of branch {branch!r} at step {step}',
           xlabel='|scale|', ylabel='channels')
  for ax in axes[:2 + len(branches)]:
    ax.legend(fontsize=7)
  viz.save_figure(path, fig)
  return names, fractions
