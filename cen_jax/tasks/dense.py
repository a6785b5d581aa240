"""Dense multitask prediction (the TPAMI scenarios on the segmentation network): the task the
shared runner drives for `config.task = 'dense'` (`config_lib.dense_config`).

`config.branches` lists the branches as 'input>task' pairs (cen_jax/branches.py). All branches
run through one RefineNet-LW on a ResNet with shared convolutions and private BN (exchange and
sparsity partition over all M branches, as for segmentation); each task has its own classifier
over its branches and, with several branches, their learned late ensemble. Tasks:

  semseg   K-class logits; cross-entropy over labelled pixels (the segmentation loss);
           mIoU, pixel and mean accuracy
  depth    1 channel, metres; L1 over pixels with a target; RMSE, abs rel, MAE, delta < 1.25
  normals  3 channels, normalised to unit length; 1 - cosine over pixels with a target;
           mean / median angle, % within 11.25 / 22.5 / 30 degrees

Every loss is a sum over pixels divided by the *global* count of pixels with a target, so a
data-parallel step equals the one-device step. Every output (branch and ensemble) gets its
task's loss, weighted by config.train.task_weights[task]; the fusion's penalty (CEN: L1 on the
partitioned bn2 scales) is added as in segmentation, counted once per output when
config.train.l1_per_output. Optimiser, staged learning rates and checkpoints are segmentation's.
"""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cen_jax import branches as branches_lib
from cen_jax import config as config_lib
from cen_jax import metrics as metrics_lib
from cen_jax import runtime
from cen_jax import transforms
from cen_jax import viz
from cen_jax.fusion import ops
from cen_jax.fusion import registry
from cen_jax.layers import resize
from cen_jax.models import build_model, exchange_scales, fusion_options
from cen_jax.runtime import AXIS, TrainState, all_finite, sum_over_devices
from cen_jax.tasks import dense_data
from cen_jax.tasks import segmentation as seg

# Reused unchanged from segmentation: optimiser, stages, state and the norm scales.
make_optimizer = seg.make_optimizer
reset_optimizer = seg.reset_optimizer
stage_starts = seg.stage_starts
total_steps = seg.total_steps
state_from_variables = seg.state_from_variables
eval_variables = seg.eval_variables
named_norm_scales = seg.named_norm_scales

TASK_LOSSES = {'semseg': 'cross_entropy', 'depth': 'l1', 'normals': 'cosine'}
TARGET_KEYS = {'semseg': 'mask', 'depth': 'target_depth', 'normals': 'target_normals'}
BATCH_KEYS = ('mask',)  # always present; the targets come from batch_keys(config)
BEST_METRIC = 'main_score'  # the first task's main metric, negated when smaller is better
BEST_MODE = 'max'
RESULT_DIGITS = 3
ONE_EVAL_SHAPE = False  # full images, grouped by size


# ----------------------------------------------------------------------------- config, model

def branches(config) -> list:
  return branches_lib.of_config(config)


def task_list(config) -> list[str]:
  return branches_lib.tasks(branches(config))


def output_kind(output: str) -> str:
  """The task an output predicts ('semseg', 'depth', 'normals'): its kind of metric."""
  return output.split(branches_lib.SEPARATOR)[-1]


def train_sample(config) -> dense_data.TrainSample:
  return dense_data.TrainSample(config)


def eval_sample(config) -> dense_data.EvalSample:
  return dense_data.EvalSample(config)


def batch_keys(config) -> tuple:
  """The host-batch keys the step reads besides the inputs: the mask and each task's target."""
  return tuple(branches_lib.unique(['mask'] + [TARGET_KEYS[t] for t in task_list(config)]))


def check_config(config):
  seg.check_config(config)
  found = branches(config)
  branches_lib.check_inputs(config)
  for b in found:
    if b.task not in TASK_LOSSES:
      raise ValueError(f'config.branches: {b.name!r} has task {b.task!r}; expected one of '
                       f'{", ".join(TASK_LOSSES)}')
  if config_lib.backbone_family(config.model) != 'resnet':
    raise ValueError(f'config.model.backbone={config.model.backbone!r}: the dense task builds '
                     f"its task heads on the ResNet only (config.model.backbone='resnet')")
  if registry.get(config.model.fusion).network != 'shared':
    raise ValueError(f'config.model.fusion={config.model.fusion!r}: the dense task needs a '
                     f'fusion of the shared network (separate/early are segmentation baselines)')
  weights = config.train.task_weights
  missing = [t for t in task_list(config) if t not in weights]
  if missing:
    raise ValueError(f'config.train.task_weights has no weight for task {missing[0]!r}')


def heads(config) -> tuple:
  """((task, channels, branch indices), ...) for the Segmenter."""
  channels = {'semseg': config.model.num_classes, 'depth': 1, 'normals': 3}
  found = branches(config)
  return tuple((t, channels[t], tuple(branches_lib.task_branches(found, t)))
               for t in branches_lib.tasks(found))


def build(config, *, axis_name=AXIS):
  return build_model(config, axis_name=axis_name, heads=heads(config))


def init_variables(config, model, rng, image_size=(64, 64)):
  x = jnp.zeros((len(branches(config)), 1) + tuple(image_size) + (3,), jnp.float32)
  with jax.threefry_partitionable(False):  # see segmentation.init_variables
    return jax.jit(lambda rng: model.init({'params': rng}, x, train=False))(rng)


def initial_state_variables(config, model, rng):
  if config.model.init_from:
    raise ValueError(f'config.model.init_from={config.model.init_from!r}: ImageNet '
                     f'initialisation is offered for the segmentation task only')
  return init_variables(config, model, rng)


def ensemble_name(task: str) -> str:
  return f'ensemble{branches_lib.SEPARATOR}{task}'


def task_output_names(config, task: str) -> list[str]:
  """The outputs of one task: its branches, then its ensemble when it has several."""
  names = [b.name for b in branches(config) if b.task == task]
  return names + [ensemble_name(task)] if len(names) > 1 else names


def output_names(config) -> list[str]:
  return [n for t in task_list(config) for n in task_output_names(config, t)]


def branch_graph(config) -> list[dict]:
  """Which input each branch reads, its head and loss, and whom it exchanges with."""
  exchanges = bool(registry.get(config.model.fusion).points)
  return branches_lib.graph(branches(config), exchanges=exchanges, losses=TASK_LOSSES)


# ----------------------------------------------------------------------------- losses

def stacked_outputs(task_out: dict) -> jax.Array:
  """[O, N, h, w, C]: the task's branches, then its ensemble when it has several."""
  if task_out['branches'].shape[0] == 1:
    return task_out['branches']
  return jnp.concatenate([task_out['branches'], task_out['ensemble'][None]], axis=0)


def target_valid(task: str, target, config):
  """Pixels with a target: labelled (semseg), depth > 0, a non-zero normal."""
  if task == 'semseg':
    return seg.labelled(target, config.data.ignore_label, config.model.num_classes)
  if task == 'depth':
    return target > 0
  return jnp.any(target != 0, axis=-1)


def unit(x):
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def loss_sums(task: str, outputs, target, valid, config):
  """[O] summed loss of every output over the pixels with a target (outputs bilinearly
  upsampled to the target size)."""
  if task == 'semseg':
    return seg.cross_entropy_sums(outputs, target, config.data.ignore_label)[0]
  pred = resize(outputs, target.shape[1:3], 'bilinear').astype(jnp.float32)
  if task == 'depth':
    per_pixel = jnp.abs(pred[..., 0] - target[None])
  else:
    per_pixel = 1.0 - jnp.sum(unit(pred) * target[None], axis=-1)
  return jnp.sum(jnp.where(valid[None], per_pixel, 0.0), axis=tuple(range(1, per_pixel.ndim)))


def train_step(state: TrainState, batch, *, model, config, starts, tx):
  """One per-device step; batch: {'x': [M, n, H, W, 3], 'mask', 'target_<task>': [n, H, W...]}."""
  rng = seg.device_rng(config, state.step)
  tasks_ = task_list(config)
  valid = {t: target_valid(t, batch[TARGET_KEYS[t]], config) for t in tasks_}
  counts = {t: jnp.maximum(jax.lax.psum(jnp.sum(valid[t]), AXIS), 1).astype(jnp.float32)
            for t in tasks_}
  num_devices = jax.lax.psum(1, AXIS)
  names = output_names(config)
  weights = jnp.asarray([config.train.task_weights[t] for t in tasks_
                         for _ in task_output_names(config, t)], jnp.float32)
  l1_weight = config.train.l1_lambda * (len(names) if config.train.l1_per_output else 1)
  fusion_ = registry.get(config.model.fusion)
  options = dict(fusion_options(config))

  def objective(params):
    outputs, batch_stats = seg.apply_train(model, params, state.batch_stats, batch['x'], rng)
    losses = jnp.concatenate([
        loss_sums(t, stacked_outputs(outputs['tasks'][t]), batch[TARGET_KEYS[t]], valid[t],
                  config) / counts[t] for t in tasks_])
    l1 = registry.penalty(fusion_, exchange_scales(params), options)
    total = jnp.sum(weights * losses) + l1_weight * l1 / num_devices
    return total, (losses, l1, outputs, batch_stats)

  grads, (losses, l1, outputs, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
  grads = sum_over_devices(grads)
  losses = jax.lax.psum(losses, AXIS)
  params, opt_state, lr_enc, lr_dec = seg.optimizer_update(config, starts, tx, state, grads)

  scalars = {f'loss/{n}': losses[i] for i, n in enumerate(names)}
  scalars['finite'] = all_finite(grads, losses)
  scalars['loss/l1'] = jnp.asarray(l1, jnp.float32)
  scalars['loss/total'] = jnp.sum(weights * losses) + l1_weight * scalars['loss/l1']
  scalars['lr/encoder'] = lr_enc
  scalars['lr/decoder'] = lr_dec
  for t in tasks_:
    members = [n for n in task_output_names(config, t) if n != ensemble_name(t)]
    if len(members) > 1:
      for i, n in enumerate(members):
        scalars[f'alpha/{n}'] = outputs['tasks'][t]['alpha'][i]
  if fusion_.monitor_scales:
    below = ops.fraction_below_threshold(exchange_scales(params), config.model.threshold)
    for m, b in enumerate(branches(config)):
      scalars[f'scales_below_threshold/{b.name}'] = below[m]
  return TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                    opt_state=opt_state), scalars


def make_train_step(config, model, starts):
  return functools.partial(train_step, model=model, config=config, starts=starts,
                           tx=make_optimizer(config))


# ----------------------------------------------------------------------------- evaluation

def task_stats(task: str, outputs, target, valid, config):
  """Summable statistics of every output of one task (metrics module)."""
  if task == 'semseg':
    preds = jnp.argmax(outputs, axis=-1).astype(jnp.int32)
    return jnp.stack([metrics_lib.confusion_matrix(target, p, config.model.num_classes,
                                                   config.data.ignore_label) for p in preds])
  if task == 'depth':
    return jnp.stack([metrics_lib.depth_sums(p[..., 0], target, valid) for p in outputs])
  return jax.tree.map(lambda *s: jnp.stack(s),
                      *[metrics_lib.normal_sums(p, target, valid) for p in outputs])


def eval_step(variables, batch, *, model, config):
  """({task: stats of its outputs}, {task: eval outputs at label size})."""
  size = batch['mask'].shape[-2:]
  out = model.apply(variables, batch['x'], train=False)['tasks']
  stats, preds = {}, {}
  for t in task_list(config):
    outputs = resize(stacked_outputs(out[t]), size, config.data.eval_upsample)
    target = batch[TARGET_KEYS[t]]
    stats[t] = task_stats(t, outputs, target, target_valid(t, target, config), config)
    preds[t] = (jnp.argmax(outputs, axis=-1).astype(jnp.int32) if t == 'semseg' else
                outputs[..., 0] if t == 'depth' else unit(outputs))
  return stats, preds


def make_eval_fn(config, model):
  return runtime.local_eval_fn(config, functools.partial(eval_step, model=model, config=config),
                               batch_keys(config), reduced_outputs=(True, False))


def empty_stats(config) -> dict:
  """Zero statistics of every task, shaped as `eval_step` returns them."""
  out = {}
  for t in task_list(config):
    n = len(task_output_names(config, t))
    if t == 'semseg':
      out[t] = np.zeros((n,) + (config.model.num_classes,) * 2)
    elif t == 'depth':
      out[t] = np.zeros((n, len(metrics_lib.DEPTH_SUMS)))
    else:
      out[t] = {'count': np.zeros(n), 'angle': np.zeros(n),
                'within': np.zeros((n, len(metrics_lib.NORMAL_THRESHOLDS))),
                'histogram': np.zeros((n, metrics_lib.NORMAL_ANGLE_BINS))}
  return out


def scores(task: str, stats) -> dict:
  if task == 'semseg':
    return metrics_lib.scores(stats)
  if task == 'depth':
    return metrics_lib.depth_scores(stats)
  return metrics_lib.normal_scores(stats)


class Evaluation:
  """Every output's metrics over the whole split: summed statistics, exact over batches,
  devices and processes (runtime.evaluate)."""

  def __init__(self, config, eval_fn, *, split: str, workdir=None):
    del split, workdir
    self.config, self.eval_fn = config, eval_fn
    self.total = None

  def add(self, variables, index: int, batch) -> dict:
    """Accumulates one batch; returns its predictions (for the preview)."""
    del index
    stats, preds = self.eval_fn(variables, batch)
    stats = jax.tree.map(lambda s: np.asarray(jax.device_get(s), np.float64), stats)
    self.total = stats if self.total is None else jax.tree.map(np.add, self.total, stats)
    return jax.device_get(preds)

  def results(self) -> dict:
    config = self.config
    # A process that got no batch still joins the sums over processes.
    total = empty_stats(config) if self.total is None else self.total
    total = jax.tree.map(runtime.sum_over_processes, total)
    metrics = {}
    for t in task_list(config):
      for i, name in enumerate(task_output_names(config, t)):
        metrics[name] = scores(t, jax.tree.map(lambda s: s[i], total[t]))
    return {'metrics': metrics, BEST_METRIC: main_score(config, metrics)}


def evaluate(config, model, variables, **kwargs) -> dict:
  """runtime.evaluate of this task (split, step, workdir, writer, eval_fn)."""
  return runtime.evaluate(sys.modules[__name__], config, model, variables, **kwargs)


def main_score(config, metrics) -> float:
  """The first task's main metric of its last output (its ensemble when it has several
  branches), negated when smaller is better: what the 'best' checkpoint maximises."""
  task = task_list(config)[0]
  metric, _, larger_is_better = metrics_lib.MAIN_METRICS[task]
  value = float(metrics[task_output_names(config, task)[-1]][metric])
  return value if larger_is_better else -value


def best_value(results) -> float:
  return float(results[BEST_METRIC])


def progress_line(results) -> str:
  parts = []
  for name, s in results['metrics'].items():
    metric, _, _ = metrics_lib.MAIN_METRICS[output_kind(name)]
    parts.append(f'{name} {metric} {s[metric]:.{RESULT_DIGITS}f}')
  return ', '.join(parts)


def preview_image(config, batch, preds) -> np.ndarray:
  """Per example: the inputs, then per task its target and every output's prediction."""
  rows = []
  count = min(config.train.num_previews, len(batch['mask']))
  for i in range(count):
    if 'valid' in batch and not batch['valid'][i]:
      continue
    panels = [(n, transforms.display_image(config, n, batch[n][i]))
              for n in config.modalities]
    for t in task_list(config):
      target = np.asarray(batch[TARGET_KEYS[t]][i])
      panels.append((f'{t} truth', display(t, target)))
      for o, name in enumerate(task_output_names(config, t)):
        panels.append((name, display(t, np.asarray(preds[t][o, i]), like=target)))
    rows.append(viz.captioned_row(panels))
  return np.concatenate(rows, axis=0) if rows else np.zeros((1, 1, 3), np.uint8)


def display(task: str, x, like=None) -> np.ndarray:
  """uint8 HxWx3: class colours, depth as grey (scaled by the target's range), normals as
  (n + 1) / 2 colours."""
  if task == 'semseg':
    return viz.colorize(x)
  if task == 'normals':
    return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  ref = np.asarray(like if like is not None else x, np.float64)
  hi = float(ref.max()) if ref.size and ref.max() > 0 else 1.0
  grey = np.clip(np.round(np.asarray(x, np.float64) / hi * 255.0), 0, 255).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


# ----------------------------------------------------------------------------- main.py modes

def summary(config) -> list[str]:
  lines = seg.model_summary(config, build_model(config, heads=heads(config)),
                            len(branches(config)))
  return lines + [f'branch {g["branch"]}: reads {g["reads"]}, {g["task"]} head, '
                  f'{g["loss"]} loss, exchanges with {g["exchanges_with"] or "none"}'
                  for g in branch_graph(config)]


def predict(config, model, variables, inputs, output, *, save_logits=False):
  raise ValueError('--mode=predict is offered for the segmentation and translation tasks; '
                   'for config.task=dense use --mode=eval (previews under <workdir>/previews)')


def import_torch_variables(config, model, path: str):
  raise ValueError('--mode=import: the official code has no dense multitask checkpoints')


def export_torch(state, output: str):
  raise ValueError('--mode=export is offered for the segmentation and translation tasks')
