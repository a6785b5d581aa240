"""Semantic segmentation (RGB-D, RefineNet-LW on a multimodal ResNet): the task the runner
(cen_jax/train.py) drives for `config.task = 'segmentation'`.

The loss is normalised by the *global* count of labelled pixels, so a data-parallel step equals
one single-device step on the whole batch. Official recipe (docs/papers.md §1.2): two SGD groups
(encoder / decoder + alpha) with staged learning rates applied in the step and the optimiser
state reset at each stage; CE of every branch and the ensemble on bilinearly upsampled logits;
L1 on the partitioned bn2 scales, counted per output. With a MiT backbone (config.model.backbone
'mit_bX') the network is TokenFusion's segmenter and `config.train.optimizer = 'adamw'` is the
official TokenFusion optimiser (PolyWarmupAdamW, three groups, restarted at every stage).
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cen_jax import config as config_lib
from cen_jax import metrics as metrics_lib
from cen_jax import models
from cen_jax import runtime
from cen_jax import tokenfusion_io
from cen_jax import torch_io  # numpy-only unless a file is a .pth
from cen_jax import transforms
from cen_jax import viz
from cen_jax.fusion import ops
from cen_jax.fusion import registry
from cen_jax.layers import resize
from cen_jax.models import (branch_names, build_model, exchange_scales, fusion_options,
                            is_encoder, path_str)
from cen_jax.runtime import AXIS, TrainState, all_finite, sum_over_devices
from cen_jax.tasks import segmentation_data
from cen_jax.tasks import segmentation_predict

BATCH_KEYS = ('mask',)
OUTPUT_KIND = 'semseg'  # main metric mIoU (metrics.MAIN_METRICS)
BEST_METRIC = 'ensemble_miou'
BEST_MODE = 'max'
RESULT_DIGITS = 2  # metrics are percentages
ONE_EVAL_SHAPE = False  # full images, grouped by size


# ----------------------------------------------------------------------------- config, model

def check_config(config):
  t = config.train
  if not len(t.stage_epochs) == len(t.lr_enc) == len(t.lr_dec):
    raise ValueError(f'config.train: stage_epochs, lr_enc and lr_dec need one entry per stage, '
                     f'got {len(t.stage_epochs)}, {len(t.lr_enc)}, {len(t.lr_dec)}')
  if t.optimizer not in OPTIMIZERS:
    raise ValueError(f'config.train.optimizer={t.optimizer!r}: expected one of '
                     f'{", ".join(OPTIMIZERS)}')
  config_lib.backbone_family(config.model)
  network = registry.get(config.model.fusion).network
  if config.model.init_from and network != 'shared':
    raise ValueError(f'config.model.init_from={config.model.init_from!r}: ImageNet weights '
                     f'initialise the shared network only, not fusion '
                     f'{config.model.fusion!r} ({network!r} network)')
  if config.data.eval_upsample not in ('bicubic', 'bilinear'):
    raise ValueError(f"config.data.eval_upsample={config.data.eval_upsample!r}: expected "
                     f"'bicubic' (official) or 'bilinear'")


def build(config, *, axis_name=AXIS):
  return build_model(config, axis_name=axis_name)


def init_variables(config, model, rng, image_size=(64, 64)):
  """Initial {'params', 'batch_stats'}. Non-partitionable threefry: with JAX's partitionable
  default, XLA:CPU needs minutes to compile the hundreds of initialisers (seconds without)."""
  x = jnp.zeros((len(config.modalities), 1) + tuple(image_size) + (3,), jnp.float32)
  with jax.threefry_partitionable(False):
    return jax.jit(lambda rng: model.init({'params': rng}, x, train=False))(rng)


def is_mit(config) -> bool:
  return config_lib.backbone_family(config.model) == 'mit'


def initial_state_variables(config, model, rng):
  """Random init, with the encoder from ImageNet weights when init_from is set: a torchvision
  ResNet, or the official SegFormer mit_bX.pth for a MiT (every branch's norms alike)."""
  variables = init_variables(config, model, rng)
  if config.model.init_from:
    read = tokenfusion_io.import_mit_imagenet if is_mit(config) else \
        torch_io.import_torchvision_resnet
    variables = torch_io.read_into(config.model.init_from, read, jax.device_get(variables))
  return variables


def state_from_variables(config, variables) -> TrainState:
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=make_optimizer(config).init(params))


def eval_variables(state) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats}


def named_norm_scales(params) -> list:
  """[(block, [M, C] scale)] of the norms at the exchange point (bn2 of every bottleneck)."""
  return models.named_exchange_scales(params)


def output_names(config) -> list[str]:
  return branch_names(config) + ['ensemble']


def train_sample(config) -> segmentation_data.TrainSample:
  return segmentation_data.TrainSample(config)


def eval_sample(config) -> segmentation_data.EvalSample:
  return segmentation_data.EvalSample(config)


# ----------------------------------------------------------------------------- optimiser

def param_groups(params):
  """'enc' for the ResNet encoder, 'dec' for the decoder, classifier and alpha."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'enc' if is_encoder(path_str(path)) else 'dec', params)


OPTIMIZERS = ('sgd', 'adamw')


def make_optimizer(config) -> optax.GradientTransformation:
  """The optimiser without its learning rate: two SGD groups as torch.optim.SGD(momentum,
  weight_decay), or with config.train.optimizer 'adamw' the groups of `make_adamw`.

  The per-stage learning rate is applied in the step (`stage_learning_rates`), so one
  compiled step serves every stage; the state is re-initialised at each stage start.
  """
  t = config.train
  if t.optimizer == 'adamw':
    return make_adamw(config)
  group = lambda wd, mom: optax.chain(optax.add_decayed_weights(wd), optax.trace(decay=mom))
  return optax.multi_transform(
      {'enc': group(t.wd_enc, t.momentum_enc), 'dec': group(t.wd_dec, t.momentum_dec)},
      param_groups)


def adamw_groups(config):
  """params -> labels of the AdamW groups. MiT: the official WeTr.get_param_groups
  (tokenfusion_io.official_param_group): 'encoder', 'encoder_norm' (no weight decay),
  'decoder' (10x lr in the official recipe: lr_dec), and 'frozen' for alpha, which the
  official optimiser holds in no group (never updated). ResNet: 'encoder' / 'decoder'."""
  mit = is_mit(config)

  def label(path, _):
    name = path_str(path)
    if mit:
      return tokenfusion_io.official_param_group(name) or 'frozen'
    return 'encoder' if is_encoder(name) else 'decoder'

  return lambda params: jax.tree_util.tree_map_with_path(label, params)


def make_adamw(config) -> optax.GradientTransformation:
  """torch.optim.AdamW per group without the learning rate: Adam's direction plus the
  decoupled weight decay (torch: p -= lr * (wd * p + adam)); the step scales by -lr."""
  t = config.train
  b1, b2 = t.adam_betas
  adam = lambda wd: optax.chain(optax.scale_by_adam(b1, b2, t.adam_eps),
                                optax.add_decayed_weights(wd))
  return optax.multi_transform(
      {'encoder': adam(t.wd_enc), 'encoder_norm': adam(0.0), 'decoder': adam(t.wd_dec),
       'frozen': optax.set_to_zero()}, adamw_groups(config))


def adamw_multiplier(config, starts, step):
  """The official PolyWarmupAdamW factor on every group's learning rate at `step`, k steps
  into its stage (the official builds a new optimiser, global_step 0, per stage): linear
  warm-up from warmup_ratio over warmup_steps, then (1 - k / poly_steps) ** poly_power, held
  at its last value from poly_steps on (official: the lr is no longer changed there)."""
  t = config.train
  bounds = jnp.asarray(starts[:-1], jnp.int32)
  k = step - bounds[jnp.sum(step >= bounds) - 1]
  poly = optax.polynomial_schedule(1.0, 0.0, t.poly_power, t.poly_steps)
  factor = poly(jnp.minimum(k, t.poly_steps - 1))
  if t.warmup_steps > 0:
    # ratio + (1 - ratio) k / warmup from a 0 -> 1 ramp: exactly the ratio at k = 0 (XLA may
    # reassociate optax's ratio -> 1 form into 1 - (1 - ratio), 1.0133e-6 in float32)
    ramp = optax.linear_schedule(0.0, 1.0, t.warmup_steps)
    factor = jnp.where(k < t.warmup_steps,
                       t.warmup_ratio + (1.0 - t.warmup_ratio) * ramp(k), factor)
  return factor


def reset_optimizer(config, params):
  return make_optimizer(config).init(params)


def stage_starts(config, steps_per_epoch: int) -> list[int]:
  """First step of every stage, plus the total number of steps at the end."""
  starts = [0]
  for epochs in config.train.stage_epochs:
    starts.append(starts[-1] + int(epochs) * steps_per_epoch)
  return starts


def total_steps(config, steps_per_epoch: int) -> int:
  total = stage_starts(config, steps_per_epoch)[-1]
  return min(total, config.train.max_steps) if config.train.max_steps > 0 else total


def stage_learning_rates(config, starts, step):
  stage = jnp.sum(step >= jnp.asarray(starts[1:-1], jnp.int32)) if len(starts) > 2 else 0
  return (jnp.asarray(config.train.lr_enc, jnp.float32)[stage],
          jnp.asarray(config.train.lr_dec, jnp.float32)[stage])


# ----------------------------------------------------------------------------- loss and step

def stacked_logits(outputs) -> jax.Array:
  """[M + 1, N, h, w, K]: every branch, then the ensemble."""
  return jnp.concatenate([outputs['branches'], outputs['ensemble'][None]], axis=0)


def labelled(mask, ignore_label, num_classes):
  """Pixels that carry a class label (not ignore, within [0, num_classes))."""
  return (mask != ignore_label) & (mask >= 0) & (mask < num_classes)


def cross_entropy_sums(logits, mask, ignore_label):
  """Per output: summed NLL over labelled pixels of logits bilinearly upsampled to the label
  size (align_corners=False, as the official training), and the labelled-pixel count."""
  logits = resize(logits, mask.shape[-2:], 'bilinear')
  valid = labelled(mask, ignore_label, logits.shape[-1])
  target = jnp.where(valid, mask, 0)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, target[None, ..., None], axis=-1)[..., 0]
  sums = jnp.sum(jnp.where(valid[None], nll, 0.0), axis=tuple(range(1, nll.ndim)))
  return sums, jnp.sum(valid)


def device_rng(config, step):
  """This step's dropout key on this device: (seed, step, device index)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), step),
                            jax.lax.axis_index(AXIS))


def apply_train(model, params, batch_stats, x, rng):
  """Training forward: (outputs, updated BN statistics)."""
  outputs, new_vars = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                                  rngs={'dropout': rng}, mutable=['batch_stats'])
  return outputs, new_vars.get('batch_stats', batch_stats)


def clip_gradients(grads, max_norm: float):
  """torch.nn.utils.clip_grad_norm_: scale all gradients by min(1, max_norm / (norm + 1e-6)),
  norm being their global L2 norm; unchanged for max_norm <= 0. Outside the optax chain, so
  the optimiser state (and every checkpoint) is the same with and without clipping."""
  if max_norm <= 0:
    return grads
  scale = jnp.minimum(1.0, max_norm / (optax.global_norm(grads) + 1e-6))
  return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)


def sgd_update(config, starts, tx, state, grads):
  """The two SGD groups with this stage's learning rates: (params, opt_state, lr_enc, lr_dec).
  `grads` are summed over devices, so clipping (train.clip_grad_norm) sees the global norm."""
  lr_enc, lr_dec = stage_learning_rates(config, starts, state.step)
  grads = clip_gradients(grads, config.train.clip_grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  lrs = jax.tree.map(lambda g: jnp.where(g == 'enc', -lr_enc, -lr_dec),
                     param_groups(state.params), is_leaf=lambda x: isinstance(x, str))
  updates = jax.tree.map(lambda u, lr: lr * u, updates, lrs)
  return optax.apply_updates(state.params, updates), opt_state, lr_enc, lr_dec


def adamw_update(config, starts, tx, state, grads):
  """The AdamW groups with this stage's learning rates times the warm-up/poly factor:
  (params, opt_state, lr_enc, lr_dec), the learning rates as applied."""
  lr_enc, lr_dec = stage_learning_rates(config, starts, state.step)
  factor = adamw_multiplier(config, starts, state.step)
  lr_enc, lr_dec = lr_enc * factor, lr_dec * factor
  grads = clip_gradients(grads, config.train.clip_grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  lrs = jax.tree.map(lambda g: -lr_dec if g == 'decoder' else -lr_enc,
                     adamw_groups(config)(state.params))
  updates = jax.tree.map(lambda u, lr: lr * u, updates, lrs)
  return optax.apply_updates(state.params, updates), opt_state, lr_enc, lr_dec


def optimizer_update(config, starts, tx, state, grads):
  """`sgd_update` or `adamw_update`, by config.train.optimizer."""
  update = adamw_update if config.train.optimizer == 'adamw' else sgd_update
  return update(config, starts, tx, state, grads)


def train_step(state: TrainState, batch, *, model, config, starts, tx):
  """One per-device training step; collectives on AXIS. batch: {'x': [M,n,H,W,3], 'mask': [n,H,W]}."""
  num_outputs = len(output_names(config))
  rng = device_rng(config, state.step)
  valid = labelled(batch['mask'], config.data.ignore_label, config.model.num_classes)
  count = jnp.maximum(jax.lax.psum(jnp.sum(valid), AXIS), 1).astype(jnp.float32)
  num_devices = jax.lax.psum(1, AXIS)
  l1_weight = config.train.l1_lambda * (num_outputs if config.train.l1_per_output else 1)
  fusion_ = registry.get(config.model.fusion)
  options = dict(fusion_options(config))

  def objective(params):
    outputs, batch_stats = apply_train(model, params, state.batch_stats, batch['x'], rng)
    ce_sums, _ = cross_entropy_sums(stacked_logits(outputs), batch['mask'],
                                    config.data.ignore_label)
    ce = ce_sums / count  # this device's share of each output's global mean
    l1, share = registry.device_penalty(fusion_, exchange_scales(params), outputs.get('masks'),
                                        options, num_devices)
    total = jnp.sum(ce) + l1_weight * l1 / share
    return total, (ce, l1, outputs, batch_stats)

  grads, (ce, l1, outputs, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
  grads = sum_over_devices(grads)
  ce = jax.lax.psum(ce, AXIS)
  if fusion_.penalty_input == 'token_scores':
    l1 = jax.lax.psum(l1, AXIS)  # this device's examples' scores -> the global batch's
  params, opt_state, lr_enc, lr_dec = optimizer_update(config, starts, tx, state, grads)

  names = output_names(config)
  scalars = {f'loss/{n}': ce[i] for i, n in enumerate(names)}
  scalars['finite'] = all_finite(grads, ce)
  scalars['loss/l1'] = jnp.asarray(l1, jnp.float32)
  scalars['loss/total'] = jnp.sum(ce) + l1_weight * scalars['loss/l1']
  scalars['lr/encoder'] = lr_enc
  scalars['lr/decoder'] = lr_dec
  for m, name in enumerate(branch_names(config)):
    scalars[f'alpha/{name}'] = outputs['alpha'][m]
  if fusion_.monitor_scales:
    below = ops.fraction_below_threshold(exchange_scales(params), config.model.threshold)
    for m, name in enumerate(config.modalities):
      scalars[f'scales_below_threshold/{name}'] = below[m]
  if fusion_.token_scores:  # equal shards: the mean over devices is the global batch's
    below = jax.lax.psum(ops.fraction_of_tokens_below(outputs['masks'], config.model.threshold),
                         AXIS) / num_devices
    for m, name in enumerate(config.modalities):
      scalars[f'tokens_below_threshold/{name}'] = below[m]
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  return new_state, scalars


def make_train_step(config, model, starts):
  return functools.partial(train_step, model=model, config=config, starts=starts,
                           tx=make_optimizer(config))


# ----------------------------------------------------------------------------- evaluation

def predict_logits(variables, x, *, model, config, label_size, method):
  """Eval-mode logits of every output, upsampled to `label_size`, with optional multi-scale
  and flip test-time augmentation (averaged logits). Returns [M + 1, N, H, W, K]."""
  total = 0.0
  count = 0
  height, width = x.shape[-3:-1]
  for scale in config.data.tta_scales:
    size = (max(int(round(height * scale)), 1), max(int(round(width * scale)), 1))
    xs = resize(x, size, 'bilinear') if scale != 1.0 else x
    for flip in ((False, True) if config.data.tta_flip else (False,)):
      xin = xs[..., ::-1, :] if flip else xs
      logits = stacked_logits(model.apply(variables, xin, train=False))
      if flip:
        logits = logits[..., ::-1, :]
      total = total + resize(logits, label_size, method)
      count += 1
  return total / count


def eval_step(variables, batch, *, model, config):
  """Confusion matrices [M + 1, K, K] of one batch, and the predictions [M + 1, N, H, W]."""
  mask = batch['mask']
  logits = predict_logits(variables, batch['x'], model=model, config=config,
                          label_size=mask.shape[-2:], method=config.data.eval_upsample)
  preds = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  num_classes = config.model.num_classes
  conf = jnp.stack([metrics_lib.confusion_matrix(mask, p, num_classes,
                                                 config.data.ignore_label) for p in preds])
  return conf, preds


def make_eval_fn(config, model):
  """(variables, host_batch) -> (confusion matrices, predictions) on this process's devices."""
  return runtime.local_eval_fn(config, functools.partial(eval_step, model=model, config=config),
                               BATCH_KEYS, reduced_outputs=(True, False))


class Evaluation:
  """Exact confusion-matrix metrics over the whole split, for every branch and the ensemble:
  each process sums its batches' matrices, then the processes' are summed (runtime.evaluate)."""

  def __init__(self, config, eval_fn, *, split: str, workdir=None):
    del split, workdir
    self.config, self.eval_fn = config, eval_fn
    self.conf = None

  def add(self, variables, index: int, batch) -> jax.Array:
    """Accumulates one batch; returns its predictions (for the preview)."""
    del index
    batch_conf, preds = self.eval_fn(variables, batch)
    self.conf = batch_conf if self.conf is None else self.conf + batch_conf
    return preds

  def results(self) -> dict:
    names = output_names(self.config)
    conf = np.zeros((len(names),) + (self.config.model.num_classes,) * 2, np.int64) \
        if self.conf is None else np.asarray(jax.device_get(self.conf), np.int64)
    conf = runtime.sum_over_processes(conf)
    return {'metrics': {n: metrics_lib.scores(conf[i]) for i, n in enumerate(names)}}


def evaluate(config, model, variables, **kwargs) -> dict:
  """runtime.evaluate of this task (split, step, workdir, writer, eval_fn)."""
  return runtime.evaluate(sys.modules[__name__], config, model, variables, **kwargs)


def output_kind(output: str) -> str:
  del output
  return OUTPUT_KIND


def best_value(results) -> float:
  """The ensemble's main metric (mIoU): what the 'best' checkpoint maximises."""
  key, _, _ = metrics_lib.MAIN_METRICS[OUTPUT_KIND]
  return float(results['metrics']['ensemble'][key])


def progress_line(results) -> str:
  key, label, _ = metrics_lib.MAIN_METRICS[OUTPUT_KIND]
  return ', '.join(f'{n} {label} {s[key]:.{RESULT_DIGITS}f}' for n, s in results['metrics'].items())


def preview_image(config, batch, preds) -> np.ndarray:
  """Inputs, ground truth and each output's prediction for the first examples of a batch."""
  preds = np.asarray(jax.device_get(preds))
  rows = []
  count = min(config.train.num_previews, preds.shape[1])
  for i in range(count):
    if 'valid' in batch and not batch['valid'][i]:
      continue
    inputs = {n: transforms.display_image(config, n, batch[n][i])
              for n in config.modalities}
    predictions = {n: preds[o, i] for o, n in enumerate(output_names(config))}
    rows.append(viz.preview_grid(inputs, np.asarray(batch['mask'][i]), predictions))
  return np.concatenate(rows, axis=0) if rows else np.zeros((1, 1, 3), np.uint8)


# ----------------------------------------------------------------------------- main.py modes

def summary(config) -> list[str]:
  """Parameter count and forward GFLOPs (XLA cost analysis) at crop_size, from shapes only."""
  lines = model_summary(config, build_model(config), len(config.modalities))
  if is_mit(config):
    network = f'{config.model.backbone} + SegFormer head'
  else:
    network = f'resnet blocks {config_lib.resnet_blocks(config.model)}'
  return [f'model: {config.model.fusion} {network}, modalities {list(config.modalities)}, '
          f'{config.model.num_classes} classes, input {config.data.crop_size}x'
          f'{config.data.crop_size}'] + lines


def abstract_variables(config, model, num_branches: int):
  """(shapes of the model's variables at crop_size, the input's shape), no compute."""
  size = config.data.crop_size
  x = jax.ShapeDtypeStruct((num_branches, 1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init({'params': jax.random.key(0)}, x, train=False),
                        x), x


def model_summary(config, model, num_branches: int) -> list[str]:
  """['params: P', 'gflops: G'] of `model` at crop_size, from shapes only."""
  variables, x = abstract_variables(config, model, num_branches)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  cost = forward.lower(variables, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return [f'params: {models.count_params(variables["params"])}',
          f'gflops: {cost["flops"] / 1e9:.2f}']


def predict(config, model, variables, inputs, output, *, save_logits=False) -> list:
  """Segment one image per modality (or matching files of one folder per modality)."""
  del model  # segmentation_predict builds its own inference function
  if all(os.path.isdir(p) for p in inputs):
    return segmentation_predict.predict_folder(config, variables, inputs, output,
                                               save_logits=save_logits)
  return segmentation_predict.predict_files(config, variables, inputs, output,
                                            save_logits=save_logits)


def import_torch_variables(config, model, path: str) -> dict:
  """Variables from an official CEN/AsymFusion PyTorch checkpoint, or, with a MiT backbone,
  an official TokenFusion one (.pth, or .npz of the same state_dict)."""
  variables = jax.device_get(init_variables(config, model, jax.random.key(config.seed)))
  if is_mit(config):
    return torch_io.read_into(path, tokenfusion_io.import_tokenfusion, variables)
  return torch_io.import_cen_checkpoint(torch_io.load_state_dict(path), variables)


def export_torch(state, output: str) -> list[str]:
  """The official-style state_dict at `output` (a .pth file; with a MiT backbone the official
  TokenFusion names, 'module.' included, or an .npz of them without torch)."""
  variables = eval_variables(state)
  if 'patch_embed1' in variables['params'].get('encoder', {}):  # a MiT: TokenFusion's segmenter
    torch_io.save_segmenter(output, tokenfusion_io.export_tokenfusion(jax.device_get(variables)))
  else:
    torch_io.save_torch_checkpoint(output, variables)
  return [output]
