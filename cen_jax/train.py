"""Segmentation training and evaluation: state, per-device steps, pmap/shard_map runners.

One per-device step function uses collectives on the named axis `AXIS` (gradient sum, BN
statistics mean inside the model). `jax.pmap` (default) or `jax.shard_map` over a device Mesh
runs it (`config.train.parallel`). The loss is normalised by the *global* count of labelled
pixels, so a data-parallel step equals one single-device step on the whole batch.
"""

import functools
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cen_jax import fusion
from cen_jax import metrics as metrics_lib
from cen_jax.layers import resize
from cen_jax.models import build_model, exchange_scales, is_encoder, path_str

AXIS = 'data'


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


# ----------------------------------------------------------------------------- optimiser

def param_groups(params):
  """'enc' for the ResNet encoder, 'dec' for the decoder, classifier and alpha."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'enc' if is_encoder(path_str(path)) else 'dec', params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Two SGD groups as torch.optim.SGD(momentum, weight_decay), without the learning rate.

  The per-stage learning rate is applied in the step (`stage_learning_rates`), so one
  compiled step serves every stage; the state is re-initialised at each stage start.
  """
  t = config.train
  group = lambda wd, mom: optax.chain(optax.add_decayed_weights(wd), optax.trace(decay=mom))
  return optax.multi_transform(
      {'enc': group(t.wd_enc, t.momentum_enc), 'dec': group(t.wd_dec, t.momentum_dec)},
      param_groups)


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


def check_train_config(config):
  t = config.train
  if not len(t.stage_epochs) == len(t.lr_enc) == len(t.lr_dec):
    raise ValueError(f'config.train: stage_epochs, lr_enc and lr_dec need one entry per stage, '
                     f'got {len(t.stage_epochs)}, {len(t.lr_enc)}, {len(t.lr_dec)}')
  if config.data.eval_upsample not in ('bicubic', 'bilinear'):
    raise ValueError(f"config.data.eval_upsample={config.data.eval_upsample!r}: expected "
                     f"'bicubic' (official) or 'bilinear'")
  if t.parallel not in ('pmap', 'shard_map'):
    raise ValueError(f"config.train.parallel={t.parallel!r}: expected 'pmap' or 'shard_map'")


# ----------------------------------------------------------------------------- model helpers

def init_variables(config, model, rng, image_size=(64, 64)):
  """Initial {'params', 'batch_stats'}. Non-partitionable threefry: with JAX's partitionable
  default, XLA:CPU needs minutes to compile the hundreds of initialisers (seconds without)."""
  x = jnp.zeros((len(config.modalities), 1) + tuple(image_size) + (3,), jnp.float32)
  with jax.threefry_partitionable(False):
    return jax.jit(lambda rng: model.init({'params': rng}, x, train=False))(rng)


def create_state(config, model, rng) -> TrainState:
  variables = init_variables(config, model, rng)
  return state_from_variables(config, variables)


def state_from_variables(config, variables) -> TrainState:
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=make_optimizer(config).init(params))


def output_names(config) -> list[str]:
  return list(config.modalities) + ['ensemble']


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


# ----------------------------------------------------------------------------- steps

def train_step(state: TrainState, batch, *, model, config, starts, tx):
  """One per-device training step; collectives on AXIS. batch: {'x': [M,n,H,W,3], 'mask': [n,H,W]}."""
  num_outputs = len(config.modalities) + 1
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), state.step),
                           jax.lax.axis_index(AXIS))
  valid = labelled(batch['mask'], config.data.ignore_label, config.model.num_classes)
  count = jnp.maximum(jax.lax.psum(jnp.sum(valid), AXIS), 1).astype(jnp.float32)
  num_devices = jax.lax.psum(1, AXIS)
  l1_weight = config.train.l1_lambda * (num_outputs if config.train.l1_per_output else 1)

  def objective(params):
    outputs, new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, batch['x'], train=True,
        rngs={'dropout': rng}, mutable=['batch_stats'])
    ce_sums, _ = cross_entropy_sums(stacked_logits(outputs), batch['mask'],
                                    config.data.ignore_label)
    ce = ce_sums / count  # this device's share of each output's global mean
    l1 = fusion.l1_penalty(exchange_scales(params)) if config.model.fusion == 'cen' else 0.0
    total = jnp.sum(ce) + l1_weight * l1 / num_devices
    return total, (ce, l1, outputs, new_vars.get('batch_stats', state.batch_stats))

  grads, (ce, l1, outputs, batch_stats) = jax.grad(objective, has_aux=True)(state.params)
  grads = jax.lax.psum(grads, AXIS)
  ce = jax.lax.psum(ce, AXIS)
  lr_enc, lr_dec = stage_learning_rates(config, starts, state.step)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  lrs = jax.tree.map(lambda g: jnp.where(g == 'enc', -lr_enc, -lr_dec),
                     param_groups(state.params), is_leaf=lambda x: isinstance(x, str))
  updates = jax.tree.map(lambda u, lr: lr * u, updates, lrs)
  params = optax.apply_updates(state.params, updates)

  names = output_names(config)
  scalars = {f'loss/{n}': ce[i] for i, n in enumerate(names)}
  scalars['loss/l1'] = jnp.asarray(l1, jnp.float32)
  scalars['loss/total'] = jnp.sum(ce) + l1_weight * scalars['loss/l1']
  scalars['lr/encoder'] = lr_enc
  scalars['lr/decoder'] = lr_dec
  for m, name in enumerate(config.modalities):
    scalars[f'alpha/{name}'] = outputs['alpha'][m]
  if config.model.fusion == 'cen':
    below = fusion.fraction_below_threshold(exchange_scales(params), config.model.threshold)
    for m, name in enumerate(config.modalities):
      scalars[f'scales_below_threshold/{name}'] = below[m]
  new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state)
  return new_state, scalars


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


# ----------------------------------------------------------------------------- runners

def device_batch(config, host_batch, num_devices: int, *, for_pmap: bool):
  """Host batch {modality: [B, H, W, 3], 'mask': [B, H, W]} -> the step's batch layout."""
  x = np.stack([np.asarray(host_batch[name], np.float32) for name in config.modalities])
  mask = np.asarray(host_batch['mask'], np.int32)
  if not for_pmap:
    return {'x': x, 'mask': mask}
  b = mask.shape[0]
  if b % num_devices:
    raise ValueError(f'host batch {b} is not divisible by {num_devices} local devices')
  n = b // num_devices
  x = x.reshape((x.shape[0], num_devices, n) + x.shape[2:]).swapaxes(0, 1)
  return {'x': x, 'mask': mask.reshape((num_devices, n) + mask.shape[1:])}


class Runner:
  """Runs the per-device train step with jax.pmap or jax.shard_map over all devices.

  `step(state, host_batch)` takes this process's share of the global batch as numpy.
  """

  def __init__(self, config, model, starts, devices=None):
    self.config = config
    self.devices = list(devices or jax.devices())
    self.kind = config.train.parallel
    self.num_local = sum(d.process_index == jax.process_index() for d in self.devices)
    self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    tx = make_optimizer(config)
    fn = functools.partial(train_step, model=model, config=config, starts=starts, tx=tx)
    if self.kind == 'pmap':
      self._step = jax.pmap(fn, axis_name=AXIS, in_axes=(None, 0), out_axes=(None, None),
                            donate_argnums=(0,), devices=self.devices)
    else:
      batch_spec = {'x': P(None, AXIS), 'mask': P(AXIS)}
      # check_vma=False: grads of replicated params are not psum'd implicitly, so the step's
      # explicit psum is the only reduction (with vma checking on it would count N times).
      mapped = jax.shard_map(fn, mesh=self.mesh, in_specs=(P(), batch_spec),
                             out_specs=(P(), P()), check_vma=False)
      self._step = jax.jit(mapped, donate_argnums=(0,))
      self.batch_sharding = {'x': NamedSharding(self.mesh, P(None, AXIS)),
                             'mask': NamedSharding(self.mesh, P(AXIS))}

  def place_state(self, state):
    return jax.device_put(state, self.replicated)

  def step(self, state, host_batch):
    if self.kind == 'pmap':
      return self._step(state, device_batch(self.config, host_batch, self.num_local,
                                            for_pmap=True))
    batch = device_batch(self.config, host_batch, 0, for_pmap=False)
    batch = {k: jax.make_array_from_process_local_data(self.batch_sharding[k], v)
             for k, v in batch.items()}
    return self._step(state, batch)


def make_eval_fn(config, model) -> Callable:
  """jit-ed eval over this process's devices: (variables, host_batch) -> (conf, preds)."""
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), (AXIS,))
  x_sharding = NamedSharding(mesh, P(None, AXIS))
  mask_sharding = NamedSharding(mesh, P(AXIS))
  replicated = NamedSharding(mesh, P())
  fn = jax.jit(functools.partial(eval_step, model=model, config=config),
               out_shardings=(replicated, None))

  def run(variables, host_batch):
    batch = device_batch(config, host_batch, 0, for_pmap=False)
    batch = {'x': jax.device_put(batch['x'], x_sharding),
             'mask': jax.device_put(batch['mask'], mask_sharding)}
    return fn(variables, batch)

  run.num_devices = len(devices)
  run.replicated = replicated
  return run


def build(config, *, axis_name=AXIS):
  check_train_config(config)
  return build_model(config, axis_name=axis_name)


# ----------------------------------------------------------------------------- loop

def maybe_initialize_distributed(config):
  """jax.distributed.initialize when the config or the environment asks for it."""
  d = config.distributed
  if jax.distributed.is_initialized():
    return
  if d.initialize:
    kwargs = {}
    if d.coordinator_address:
      kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                    process_id=d.process_id)
    jax.distributed.initialize(**kwargs)


def replicated_sharding():
  return NamedSharding(Mesh(np.asarray(jax.devices()), (AXIS,)), P())


def initial_state(config, model) -> TrainState:
  """Fresh state (optionally with ImageNet/torch weights), replicated on every device."""
  rng = jax.random.key(config.seed)
  variables = init_variables(config, model, rng)
  if config.model.init_from:
    from cen_jax import torch_io  # numpy-only unless the file is a .pth
    weights = torch_io.load_state_dict(config.model.init_from)
    variables = torch_io.import_torchvision_resnet(weights, jax.device_get(variables))
  return jax.device_put(state_from_variables(config, variables), replicated_sharding())


def evaluate(config, model, variables, *, split, step, workdir=None, writer=None,
             eval_fn=None) -> dict:
  """Exact confusion-matrix metrics over the whole split, for every branch and the ensemble.

  Each process evaluates its share on its local devices; confusion matrices are summed over
  processes. Writes <workdir>/eval_results.json and a preview PNG when workdir is given. Pass
  the same `eval_fn` (make_eval_fn) to repeated evaluations so they compile once.
  """
  from cen_jax import input_pipeline, viz
  from cen_jax import logging as log_lib
  eval_fn = eval_fn or make_eval_fn(config, model)
  variables = jax.device_put(variables, eval_fn.replicated)
  names = output_names(config)
  conf = None
  preview = None
  batches = input_pipeline.eval_iterator(
      config, split, batch_size=config.data.eval_batch_size * eval_fn.num_devices,
      process_index=jax.process_index(), process_count=jax.process_count())
  for batch in batches:
    batch_conf, preds = eval_fn(variables, batch)
    conf = batch_conf if conf is None else conf + batch_conf
    if preview is None and config.train.num_previews > 0:
      preview = (batch, preds)
  conf = np.zeros((len(names),) + (config.model.num_classes,) * 2, np.int64) if conf is None \
      else np.asarray(jax.device_get(conf), np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    conf = np.asarray(multihost_utils.process_allgather(conf)).sum(0)
  results = {'step': int(step), 'split': split,
             'metrics': {n: metrics_lib.scores(conf[i]) for i, n in enumerate(names)}}
  if workdir is not None and jax.process_index() == 0:
    log_lib.write_json_atomic(os.path.join(workdir, 'eval_results.json'), results)
    if preview is not None:
      viz.save_png(os.path.join(workdir, 'previews', f'step_{int(step):07d}.png'),
                   preview_image(config, *preview))
  if writer is not None:
    writer.write_scalars(step, {f'eval/{n}/{k}': v for n, s in results['metrics'].items()
                                for k, v in s.items()})
  return results


def preview_image(config, batch, preds) -> np.ndarray:
  """Inputs, ground truth and each output's prediction for the first examples of a batch."""
  from cen_jax import input_pipeline, viz
  preds = np.asarray(jax.device_get(preds))
  rows = []
  count = min(config.train.num_previews, preds.shape[1])
  for i in range(count):
    if 'valid' in batch and not batch['valid'][i]:
      continue
    inputs = {n: input_pipeline.to_display_image(config, n, batch[n][i])
              for n in config.modalities}
    predictions = {n: preds[o, i] for o, n in enumerate(output_names(config))}
    rows.append(viz.preview_grid(inputs, np.asarray(batch['mask'][i]), predictions))
  return np.concatenate(rows, axis=0) if rows else np.zeros((1, 1, 3), np.uint8)


def train_and_evaluate(config, workdir: str) -> dict:
  """Train with the staged recipe, evaluating and checkpointing; resumes from the workdir."""
  from cen_jax import checkpoints as ckpt_lib
  from cen_jax import input_pipeline
  from cen_jax import logging as log_lib
  maybe_initialize_distributed(config)
  model = build(config)
  steps_per_epoch = input_pipeline.num_examples(config, config.data.train_split) // \
      config.train.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'config.train.batch_size={config.train.batch_size} exceeds the '
                     f'{config.data.train_split!r} split of {config.data.name!r}')
  if config.train.batch_size % jax.device_count():
    raise ValueError(f'config.train.batch_size={config.train.batch_size} is not divisible by '
                     f'{jax.device_count()} devices')
  starts = stage_starts(config, steps_per_epoch)
  num_steps = total_steps(config, steps_per_epoch)
  eval_every = max(int(config.train.eval_every_epochs * steps_per_epoch), 1)

  state = initial_state(config, model)
  meta = ckpt_lib.model_meta(config, state.params)
  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.train.keep_checkpoints)
  ckpts.check_compatible(meta, workdir)  # before anything is written
  train_iter = input_pipeline.train_iterator(
      config, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  start = ckpts.latest_step()
  if start is not None:
    state = ckpts.restore(start, ckpt_lib.abstract_like(state, replicated_sharding()),
                          data_iterator=train_iter)
  first_step = int(jax.device_get(state.step))
  runner = Runner(config, model, starts)
  state = runner.place_state(state)
  reset_opt = jax.jit(make_optimizer(config).init, out_shardings=replicated_sharding())
  eval_fn = make_eval_fn(config, model)
  writer = log_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  progress = log_lib.ProgressBar(num_steps, initial=first_step,
                                 enabled=jax.process_index() == 0)
  pending = []
  results = {}
  for step in range(first_step, num_steps):
    if step in starts[1:-1]:  # a new stage: fresh optimiser state (official)
      state = state.replace(opt_state=reset_opt(state.params))
    state, scalars = runner.step(state, next(train_iter))
    pending.append(scalars)
    done = step + 1
    progress.update(1)
    if done % config.train.log_every_steps == 0 or done == num_steps:
      host = jax.device_get(pending)  # the loop's only host sync between evaluations
      pending = []
      summary = {k: float(np.mean([h[k] for h in host])) for k in host[0]}
      writer.write_scalars(done, summary)
      progress.set_postfix(loss=summary['loss/total'])
    if done % eval_every == 0 or done == num_steps:
      variables = {'params': state.params, 'batch_stats': state.batch_stats}
      results = evaluate(config, model, variables, split=config.data.eval_split, step=done,
                         workdir=workdir, writer=writer, eval_fn=eval_fn)
      ens = results['metrics']['ensemble']
      progress.write(f'step {done}: ' + ', '.join(
          f'{n} mIoU {s["miou"]:.2f}' for n, s in results['metrics'].items()))
      ckpts.save(done, state, meta, data_iterator=train_iter,
                 metrics={ckpt_lib.BEST_METRIC: ens['miou']})
    elif done % config.train.checkpoint_every_steps == 0:
      ckpts.save(done, state, meta, data_iterator=train_iter)
  progress.close()
  ckpts.close()
  writer.close()
  return results


def restore_variables(config, workdir: str, model, checkpoint: str = '') -> tuple[dict, int]:
  """(variables, step) from the workdir's best checkpoint, or `checkpoint` (a step number or a
  path to a step directory)."""
  from cen_jax import checkpoints as ckpt_lib
  directory, step = workdir, None
  if checkpoint:
    if checkpoint.isdigit():
      step = int(checkpoint)
    else:
      path = os.path.abspath(checkpoint.rstrip('/'))
      directory, step = os.path.dirname(os.path.dirname(path)), int(os.path.basename(path))
  ckpts = ckpt_lib.Checkpoints(directory, read_only=True)
  if step is None:
    step = ckpts.best_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {os.path.join(directory, "checkpoints")!r}')
  template = jax.eval_shape(lambda: state_from_variables(
      config, init_variables(config, model, jax.random.key(0))))
  ckpts.check_compatible(ckpt_lib.model_meta(config, template.params), directory)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=replicated_sharding()),
                          template)
  restored = ckpts.restore(step, abstract)
  ckpts.close()
  return {'params': restored.params, 'batch_stats': restored.batch_stats}, step


def import_torch_checkpoint(config, path: str, workdir: str) -> int:
  """Official CEN/AsymFusion PyTorch checkpoint -> orbax checkpoint (step 0) in `workdir`, from
  which eval, predict and training (fresh optimiser state) start."""
  from cen_jax import checkpoints as ckpt_lib
  from cen_jax import torch_io
  model = build(config)
  variables = jax.device_get(init_variables(config, model, jax.random.key(config.seed)))
  variables = torch_io.import_cen_checkpoint(torch_io.load_state_dict(path), variables)
  state = jax.device_put(state_from_variables(config, variables), replicated_sharding())
  meta = ckpt_lib.model_meta(config, state.params)
  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.train.keep_checkpoints)
  ckpts.check_compatible(meta, workdir)
  if ckpts.latest_step() is not None:
    raise ValueError(f'workdir {workdir!r} already holds checkpoints; import into a new one')
  ckpts.save(0, state, dict(meta, imported_from=os.path.abspath(path)))
  ckpts.close()
  return 0
