"""Multi-domain image translation (pix2pix with channel exchange): the task the runner
(cen_jax/train.py) drives for `config.task = 'translation'`.

Official recipe (yikaiw/CEN image2image_translation/main.py; docs/papers.md §1.1(i), §1.2): one
generator whose M branches (one per input domain) share every convolution, keep private
InstanceNorm and exchange channels by its scales; one PatchGAN discriminator shared by all
branches. Each step trains D, then G against the updated D:

  D loss = sum_m 0.5 * (BCE(D(x_m, y), 1) + BCE(D(x_m, G_m), 0))
  G loss = sum_m BCE(D(x_m, G_m), 1) + l1_weight * sum_{o in branches + ensemble} L1(o, y)
           + l1_lambda * sum |partitioned encoder IN scales|        (counted once)

With config.model.backbone 'mit_b0'..'mit_b5', TokenFusion's Mix Transformer generator and
discriminator (cen_jax/models/mit_translation.py) run on the same step: D gets its own
stochastic-depth keys, and the penalty is the fusion's (TokenFusion: l1_lambda * sum |token
score| over the global batch, each device summing its own examples; cen: the norm2 scales).
Adam's learning rates are multiplied by the global batch with config.train.lr_times_batch
(TokenFusion's recipe).

Cycle multimodal fusion (`config.branches = branches.cycle(domains)`, TPAMI): branch m reads
domain m and predicts domain m + 1 mod M; each branch's L1 and D pairs use its own target, and
there is no ensemble (the branches predict different domains). Any 'input>target' branches work
the same way; the ensemble exists when all branches share one target.

with G run twice per step (once for D's fake images, once for its own loss; independent dropout
masks, as the official two forward passes), Adam(lr 2e-4, betas (0.5, 0.999)) for both. Every
loss is a mean over the *global* batch, so a data-parallel step equals one device.

Evaluation follows the official (and pix2pix) convention: G normalises with instance statistics
and keeps dropout on (`config.model.test_dropout=False` turns it off); its dropout masks come
from a key fixed by (seed, batch index), so an evaluation is reproducible. Metrics per branch
and ensemble: L1 (mean |output - target| on [-1, 1]) and RMSE (root of the mean per-image
MSE), as the official logs them, and with `config.eval.inception_weights` FID and KID x100
(cen_jax/fid.py): pool3 features of every output, and of the target, computed on device in the
same pass (the official's per-image min-max stretch to 8 bits, no PNG round trip); statistics
streamed on host in float64 and summed over processes, features gathered for KID. The target
features of a split are cached in the workdir (fid_real/*.npz, keyed by dataset, split, size and
weights), so later evaluations run Inception on the outputs only.
"""

import collections
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cen_jax import branches as branches_lib
from cen_jax import compile_cache
from cen_jax import config as config_lib
from cen_jax import fid
from cen_jax import image_files
from cen_jax import input_pipeline
from cen_jax import metrics as metrics_lib
from cen_jax import models
from cen_jax import runtime
from cen_jax import tokenfusion_io
from cen_jax import torch_io
from cen_jax import viz
from cen_jax.fusion import ops
from cen_jax.io_utils import atomic_write
from cen_jax.fusion import registry
from cen_jax.runtime import AXIS, TrainState, all_finite, sum_over_devices
from cen_jax.tasks import translation_data
from cen_jax.tasks.translation_data import branch_targets, has_ensemble

BATCH_KEYS = ('target',)
OUTPUT_KIND = 'image'  # every output is an image: main metric L1 (metrics.MAIN_METRICS)
BEST_METRIC = 'ensemble_l1'
BEST_MODE = 'min'
RESULT_DIGITS = 4
ONE_EVAL_SHAPE = True  # every example is resized to crop_size

Models = collections.namedtuple('Models', ['generator', 'discriminator'])
NETS = ('generator', 'discriminator')


# ----------------------------------------------------------------------------- config, model

def check_config(config):
  registry.check_translation(registry.get(config.model.fusion), len(branches_lib.inputs(config)),
                             config.model.get('backbone', 'unet'))
  if config.get('branches', ()):
    branches_lib.check_inputs(config)
    for b in branches_lib.of_config(config):
      if b.input == b.task:
        raise ValueError(f'config.branches: {b.name!r} predicts its own input')
    if not has_ensemble(config) and config.data.target:
      raise ValueError(f'config.data.target={config.data.target!r}: the branches have their '
                       f'own targets (config.branches); set config.data.target to \'\'')
    if not has_ensemble(config) and fid_enabled(config):
      raise ValueError('config.eval.inception_weights: FID/KID are computed against one target '
                       'domain; branches with different targets (cycle fusion) have none')
    return
  if config.data.target in config.modalities:
    raise ValueError(f'config.data.target={config.data.target!r} is also an input domain '
                     f'(config.modalities={list(config.modalities)})')


def build(config, *, axis_name=AXIS) -> Models:
  return Models(*models.build_translation_models(config, axis_name=axis_name))


def image_shape(config) -> tuple:
  size = int(config.data.crop_size)
  return (size, size, 3)


def init_variables(config, model: Models, rng):
  """{'params': {'generator', 'discriminator'}, 'batch_stats': {...}}: N(0, 0.02) kernels."""
  x = jnp.zeros((len(branches_lib.inputs(config)), 1) + image_shape(config), jnp.float32)
  rng_g, rng_d = jax.random.split(rng)

  def init(rng_g, rng_d):
    g = model.generator.init({'params': rng_g, 'dropout': rng_g}, x, train=False,
                             deterministic=True)
    d = model.discriminator.init({'params': rng_d}, x, x, train=False, deterministic=True)
    return {'params': {'generator': g['params'], 'discriminator': d['params']},
            'batch_stats': {'generator': g.get('batch_stats', {}),
                            'discriminator': d.get('batch_stats', {})}}

  with jax.threefry_partitionable(False):  # fast XLA:CPU compile (see segmentation)
    return jax.jit(init)(rng_g, rng_d)


def initial_state_variables(config, model, rng):
  return init_variables(config, model, rng)


def bias_correction(beta: float, count) -> jax.Array:
  """1 - beta^count in float32, accurate to its rounding: -expm1(count * log(beta)), with
  log(beta) taken in float64. (optax raises the float32 beta to the power: 1 - 0.999f is
  0.00099998713, 1.3e-5 under torch's 1 - 0.999 in double.)"""
  return -jnp.expm1(count.astype(jnp.float32) * np.float32(np.log(beta)))


def scale_by_torch_adam(b1: float, b2: float, eps: float = 1e-8) -> optax.GradientTransformation:
  """torch.optim.Adam's step direction: (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps).

  The state is optax.scale_by_adam's (ScaleByAdamState: count, mu, nu), so checkpoints and
  optimiser states are interchangeable with optax.adam's. What differs is the bias
  corrections: optax.adam raises the float32 b2 (0.999 rounds to 0.99900001) to the power t,
  so its 1 - b2^t is relatively 1.3e-5 (t = 1) and 2e-5 (t = 2) too small, and its steps
  0.6e-5 and 1e-5 shorter than torch's, which takes 1 - b2^t in double: a systematic error on
  every parameter, against ~1e-7 for the rounding of a step (tests/test_gan_two_steps.py).
  """
  def init_fn(params):
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=jax.tree.map(jnp.zeros_like, params),
                                  nu=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * m, updates, state.mu)
    nu = jax.tree.map(lambda g, v: (1 - b2) * jnp.square(g) + b2 * v, updates, state.nu)
    count = optax.safe_increment(state.count)
    correction1 = bias_correction(b1, count)
    sqrt_correction2 = jnp.sqrt(bias_correction(b2, count))
    updates = jax.tree.map(
        lambda m, v: (m / (jnp.sqrt(v) / sqrt_correction2 + eps)) / correction1, mu, nu)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def torch_adam(lr: float, b1: float, b2: float, eps: float = 1e-8) -> optax.GradientTransformation:
  """torch.optim.Adam(lr, betas=(b1, b2), eps): optax.adam's structure and state."""
  return optax.chain(scale_by_torch_adam(b1, b2, eps), optax.scale_by_learning_rate(lr))


def learning_rates(config) -> tuple[float, float]:
  """(G's, D's) Adam learning rate: lr_g and lr_d, times the global batch size with
  config.train.lr_times_batch (TokenFusion's main.py; CEN's does not scale them)."""
  t = config.train
  scale = t.batch_size if t.get('lr_times_batch', False) else 1
  return t.lr_g * scale, t.lr_d * scale


def optimizers(config) -> dict:
  """Adam for G and for D (torch.optim.Adam defaults otherwise: eps 1e-8, no weight decay),
  with torch's bias corrections (`scale_by_torch_adam`)."""
  t = config.train
  lr_g, lr_d = learning_rates(config)
  return {'generator': torch_adam(lr_g, t.beta1, t.beta2),
          'discriminator': torch_adam(lr_d, t.beta1, t.beta2)}


def reset_optimizer(config, params):
  return {net: tx.init(params[net]) for net, tx in optimizers(config).items()}


def state_from_variables(config, variables) -> TrainState:
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables['batch_stats'],
                    opt_state=reset_optimizer(config, params))


def eval_variables(state) -> dict:
  """The generator's variables (all that evaluation, predict and the parity checks need)."""
  return {'params': state.params['generator'], 'batch_stats': state.batch_stats['generator']}


def stage_starts(config, steps_per_epoch: int) -> list[int]:
  """One stage at a constant learning rate (the official schedule)."""
  return [0, int(config.train.num_epochs) * steps_per_epoch]


def total_steps(config, steps_per_epoch: int) -> int:
  total = stage_starts(config, steps_per_epoch)[-1]
  return min(total, config.train.max_steps) if config.train.max_steps > 0 else total


def train_sample(config) -> translation_data.TrainSample:
  return translation_data.TrainSample(config)


def eval_sample(config) -> translation_data.EvalSample:
  return translation_data.EvalSample(config)


def output_names(config) -> list[str]:
  return models.branch_names(config) + (['ensemble'] if has_ensemble(config) else [])


def exchange_scales(generator_params) -> list:
  return models.translation_exchange_scales(generator_params)


def named_norm_scales(params) -> list:
  """[(block, [M, C] scale)] of the generator's encoder InstanceNorms (conv1..convN)."""
  return models.named_translation_exchange_scales(params['generator'])


def fusion_options(config) -> tuple:
  return models.fusion_options(config)


# ----------------------------------------------------------------------------- GAN step

def stacked_outputs(outputs, with_ensemble=True) -> jax.Array:
  """[M (+ 1), N, H, W, 3]: every branch, then the ensemble."""
  if not with_ensemble:
    return outputs['branches']
  return jnp.concatenate([outputs['branches'], outputs['ensemble'][None]], axis=0)


def output_targets(y, num_outputs: int) -> jax.Array:
  """[O, N, H, W, 3] targets of the outputs: the one target [N, H, W, 3] of every output, or
  the branches' own targets [N, M, H, W, 3] (batch axis first, as the host batch)."""
  if y.ndim == 4:
    return jnp.broadcast_to(y[None], (num_outputs,) + y.shape)
  return jnp.moveaxis(y, 1, 0)


def bce_with_logits_sums(logits, real: bool):
  """Per branch: summed BCE(sigmoid(logits), 1 if real else 0) over [N, h, w, 1]. The log-sigmoid
  form of torch's BCELoss on sigmoid outputs (equal until |logit| > 100, where BCELoss clamps)."""
  log_p = jax.nn.log_sigmoid(logits if real else -logits)
  return -jnp.sum(log_p.astype(jnp.float32), axis=tuple(range(1, logits.ndim)))


def gan_step(state: TrainState, batch, *, model: Models, config, tx: dict):
  """One per-device GAN step (D, then G against the updated D); collectives on AXIS.

  batch: {'x': [M, n, S, S, 3] inputs, 'target': [n, S, S, 3] (or [n, M, S, S, 3], each
  branch its own)}, all in [-1, 1].
  """
  G, D = model
  t = config.train
  x, y = batch['x'], batch['target']
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), state.step),
                           jax.lax.axis_index(AXIS))
  rng_d, rng_g = jax.random.split(rng)
  # D's own stochastic depth (the MiT discriminator): one key per D call of the step.
  key_real, key_fake, key_g = jax.random.split(jax.random.fold_in(rng, 1), 3)
  num_devices = jax.lax.psum(1, AXIS)
  global_n = jax.lax.psum(x.shape[1], AXIS)
  targets = output_targets(y, x.shape[0])  # the D pairs' real images, per branch
  ensemble = has_ensemble(config)
  g_stats, d_stats = state.batch_stats['generator'], state.batch_stats['discriminator']
  d_params = state.params['discriminator']

  def generate(params, stats, key):
    out, new = G.apply({'params': params, 'batch_stats': stats}, x, train=True,
                       deterministic=False, rngs={'dropout': key}, mutable=['batch_stats'])
    return out, new['batch_stats']

  def discriminate(params, stats, images, key):
    logits, new = D.apply({'params': params, 'batch_stats': stats}, x, images, train=True,
                          deterministic=False, rngs={'dropout': key},
                          mutable=['batch_stats'])
    return logits, new['batch_stats']

  def patch_mean(sums, logits):  # this device's share of the global mean over N x h x w
    return sums / (global_n * np.prod(logits.shape[2:]))

  # Discriminator: real pairs, then pairs with G's (fixed) outputs, as the official order.
  fake_out, g_stats = generate(state.params['generator'], g_stats, rng_d)
  fake = jax.lax.stop_gradient(fake_out['branches'])

  def d_objective(params):
    real_logits, stats = discriminate(params, d_stats, targets, key_real)
    fake_logits, stats = discriminate(params, stats, fake, key_fake)
    real = patch_mean(bce_with_logits_sums(real_logits, True), real_logits)
    false = patch_mean(bce_with_logits_sums(fake_logits, False), fake_logits)
    return jnp.sum(0.5 * (real + false)), (real, false, stats)

  d_grads, (d_real, d_fake, d_stats) = jax.grad(d_objective, has_aux=True)(d_params)
  d_grads = sum_over_devices(d_grads)
  d_updates, d_opt = tx['discriminator'].update(d_grads, state.opt_state['discriminator'],
                                                d_params)
  d_params = optax.apply_updates(d_params, d_updates)

  # Generator against the updated discriminator.
  pixels = global_n * np.prod(y.shape[-3:])  # per output: N x S x S x 3
  fusion_ = registry.get(config.model.fusion)
  use_slim = fusion_.penalty is not None and t.l1_lambda > 0
  options = dict(fusion_options(config))

  def g_objective(params):
    out, stats = generate(params, g_stats, rng_g)
    fake_logits, new_d_stats = discriminate(d_params, d_stats, out['branches'], key_g)
    adversarial = patch_mean(bce_with_logits_sums(fake_logits, True), fake_logits)
    outputs = stacked_outputs(out, ensemble).astype(jnp.float32)
    diff = jnp.abs(outputs - output_targets(y, outputs.shape[0]).astype(jnp.float32))
    pixel_l1 = jnp.sum(diff, axis=tuple(range(1, diff.ndim))) / pixels  # [M + 1]
    slim, share = (registry.device_penalty(fusion_, exchange_scales(params), out.get('masks'),
                                           options, num_devices) if use_slim
                   else (jnp.zeros(()), 1))
    total = (jnp.sum(adversarial) + t.l1_weight * jnp.sum(pixel_l1)
             + t.l1_lambda * slim / share)
    return total, (adversarial, pixel_l1, slim, stats, new_d_stats, out)

  g_params = state.params['generator']
  g_grads, aux = jax.grad(g_objective, has_aux=True)(g_params)
  adversarial, pixel_l1, slim, g_stats, d_stats, out = aux
  if use_slim and fusion_.penalty_input == 'token_scores':
    slim = jax.lax.psum(slim, AXIS)  # this device's examples' scores -> the global batch's
  g_grads = sum_over_devices(g_grads)
  g_updates, g_opt = tx['generator'].update(g_grads, state.opt_state['generator'], g_params)
  g_params = optax.apply_updates(g_params, g_updates)

  d_real, d_fake, adversarial, pixel_l1 = jax.lax.psum((d_real, d_fake, adversarial, pixel_l1),
                                                       AXIS)
  scalars = {'finite': all_finite(d_grads, g_grads, d_real, d_fake, adversarial, pixel_l1),
             'loss/discriminator': jnp.sum(0.5 * (d_real + d_fake)),
             'loss/d_real': jnp.sum(d_real), 'loss/d_fake': jnp.sum(d_fake),
             'loss/g_adversarial': jnp.sum(adversarial), 'loss/slim': slim}
  for o, name in enumerate(output_names(config)):
    scalars[f'loss/l1_{name}'] = pixel_l1[o]
  scalars['loss/total'] = (jnp.sum(adversarial) + t.l1_weight * jnp.sum(pixel_l1)
                           + t.l1_lambda * slim)  # the generator's objective, as logged
  if ensemble:
    for m, name in enumerate(models.branch_names(config)):
      scalars[f'alpha/{name}'] = out['alpha'][m]
  if fusion_.monitor_scales:
    below = ops.fraction_below_threshold(exchange_scales(g_params), config.model.threshold)
    for m, name in enumerate(models.branch_names(config)):
      scalars[f'scales_below_threshold/{name}'] = below[m]
  if fusion_.token_scores:  # equal shards: the mean over devices is the global batch's
    below = jax.lax.psum(ops.fraction_of_tokens_below(out['masks'], config.model.threshold),
                         AXIS) / num_devices
    for m, name in enumerate(models.branch_names(config)):
      scalars[f'tokens_below_threshold/{name}'] = below[m]
  new_state = TrainState(
      step=state.step + 1,
      params={'generator': g_params, 'discriminator': d_params},
      batch_stats={'generator': g_stats, 'discriminator': d_stats},
      opt_state={'generator': g_opt, 'discriminator': d_opt})
  return new_state, scalars


def make_train_step(config, model, starts):
  del starts  # one stage
  return functools.partial(gan_step, model=model, config=config, tx=optimizers(config))


# ----------------------------------------------------------------------------- evaluation

def generate(variables, x, rng, *, model: Models, config):
  """Evaluation/predict forward of G: [M (+ 1), N, S, S, 3] outputs in [-1, 1]."""
  out = model.generator.apply(variables, x, train=False,
                              deterministic=not config.model.test_dropout,
                              rngs={'dropout': rng})
  return stacked_outputs(out, has_ensemble(config))


def eval_step(inputs, batch, *, model, config, with_target_features=True):
  """Per output and example: mean |o - y| and mean (o - y)^2 [M + 1, N], the outputs, and with
  Inception variables (inputs[2] not None) pool3 features [M + 1 (+ 1 target), N, 2048]."""
  variables, rng, inception = inputs
  outputs = generate(variables, batch['x'], rng, model=model, config=config)
  diff = outputs.astype(jnp.float32) - output_targets(
      batch['target'], outputs.shape[0]).astype(jnp.float32)
  axes = (2, 3, 4)
  l1, mse = jnp.mean(jnp.abs(diff), axes), jnp.mean(jnp.square(diff), axes)
  if inception is None:
    return l1, mse, outputs
  images = outputs.astype(jnp.float32)
  if with_target_features:
    images = jnp.concatenate([images, batch['target'][None].astype(jnp.float32)], axis=0)
  images = fid.stretch_to_unit_range(images.reshape((-1,) + images.shape[2:]),
                                     quantize=config.eval.fid_8bit)
  feats = fid.features(inception, images)
  return l1, mse, outputs, feats.reshape((-1, outputs.shape[1], feats.shape[-1]))


def fid_enabled(config) -> bool:
  return bool(config.eval.inception_weights) if 'eval' in config else False


def make_eval_fn(config, model):
  """run((variables, key, inception variables or None), host_batch); with FID on, the variant
  without target features is run.outputs_only."""
  def build(with_target_features):
    step = functools.partial(eval_step, model=model, config=config,
                             with_target_features=with_target_features)
    return runtime.local_eval_fn(config, step, BATCH_KEYS,
                               reduced_outputs=(False,) * (4 if fid_enabled(config) else 3))

  run = build(True)
  if fid_enabled(config):
    run.outputs_only = build(False)
  elif jax.process_index() == 0:
    print('fid/kid: skipped (config.eval.inception_weights is not set; give the pytorch-fid '
          'pt_inception-2015-12-05-*.pth or its .npz)', file=sys.stderr)
  return run


_INCEPTION_CACHE = {}


def inception_variables(config) -> dict:
  """The FID Inception's variables from config.eval.inception_weights (read once per file)."""
  path = config.eval.inception_weights
  key = (path, os.path.getmtime(path) if os.path.isfile(path) else None)
  if key not in _INCEPTION_CACHE:
    variables = fid.load_weights(path)
    _INCEPTION_CACHE.clear()
    _INCEPTION_CACHE[key] = (variables, fid.weights_fingerprint(variables))
  return _INCEPTION_CACHE[key]


def real_features_path(config, split: str, workdir) -> str | None:
  if workdir is None:
    return None
  d = config.data
  name = f'{d.name}-{d.builder_config or "default"}-{d.target}-{split}-{d.crop_size}.npz'
  return os.path.join(workdir, 'fid_real', name)


def load_real_features(path, fingerprint: str, count: int):
  """Cached target features, or None when absent or made for other weights/data."""
  if path is None or not os.path.isfile(path):
    return None
  try:
    with np.load(path) as cached:
      if str(cached['weights']) != fingerprint or cached['features'].shape[0] != count:
        return None
      return np.asarray(cached['features'], np.float32)
  except (OSError, ValueError, KeyError):
    return None


def save_real_features(path, fingerprint: str, feats) -> None:
  if path is None or jax.process_index() != 0:
    return
  with atomic_write(path, 'wb') as f:
    np.savez(f, features=np.asarray(feats, np.float32), weights=np.asarray(fingerprint))


def gather_rows(local: np.ndarray) -> np.ndarray:
  """[O, n_local, d] from every process -> [O, n_total, d] (process order)."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils
  counts = np.asarray(multihost_utils.process_allgather(np.int64(local.shape[1]))).reshape(-1)
  padded = np.zeros(local.shape[:1] + (int(counts.max()),) + local.shape[2:], local.dtype)
  padded[:, :local.shape[1]] = local
  everything = np.asarray(multihost_utils.process_allgather(padded))  # [P, O, max, d]
  return np.concatenate([everything[p, :, :c] for p, c in enumerate(counts)], axis=1)


def sum_stats_over_processes(stats):
  flat = runtime.sum_over_processes(np.concatenate([[s.count] for s in stats] +
                                                   [s.total for s in stats] +
                                                   [s.gram.ravel() for s in stats]))
  o, d = len(stats), stats[0].total.shape[0]
  counts, totals, grams = np.split(flat, [o, o + o * d])
  return [fid.FeatureStats(int(round(counts[i])), totals.reshape(o, d)[i],
                           grams.reshape(o, d, d)[i]) for i in range(o)]


def fid_kid_scores(output_stats, output_feats, real_stats, real_feats, *, seed) -> list[dict]:
  return [{'fid': fid.fid_from_stats(stats, real_stats),
           'kid': fid.kid(feats, real_feats, seed=seed)}
          for stats, feats in zip(output_stats, output_feats)]


def eval_key(config, batch_index: int):
  """The dropout key of eval batch `batch_index` (evaluation is reproducible)."""
  return jax.random.fold_in(jax.random.key(config.seed + 1), batch_index)


class Evaluation:
  """L1 and RMSE (and with inception weights FID and KID x100) of every branch and the ensemble
  (each process its share of the batches; sums combined over processes), for the evaluate loop
  (runtime.evaluate)."""

  def __init__(self, config, eval_fn, *, split: str, workdir=None):
    self.config, self.eval_fn = config, eval_fn
    self.names = output_names(config)
    self.sums = np.zeros((2, len(self.names)), np.float64)  # per output: sum of L1, of MSE
    self.count = 0
    self.inception = self.real_feats = self.real_path = self.fingerprint = None
    self.run = eval_fn
    if fid_enabled(config):
      inception, fingerprint = inception_variables(config)
      # What the cached features depend on.
      self.fingerprint = fingerprint + f' fid_8bit={bool(config.eval.fid_8bit)}'
      self.inception = jax.device_put(inception, eval_fn.replicated)
      self.real_path = real_features_path(config, split, workdir)
      real_feats = load_real_features(self.real_path, self.fingerprint,
                                      input_pipeline.num_examples(config, split))
      cached_everywhere = runtime.sum_over_processes(
          np.asarray([real_feats is not None], np.int64))[0] == jax.process_count()
      if cached_everywhere:
        self.run = eval_fn.outputs_only
        self.real_feats = real_feats
      self.stats = [fid.empty_stats() for _ in range(len(self.names) + (self.real_feats is None))]
      self.local_feats = [[] for _ in self.stats]

  def add(self, variables, index: int, batch) -> jax.Array:
    """Accumulates one batch; returns its outputs (for the preview)."""
    key = jax.device_put(eval_key(self.config, index * jax.process_count() + jax.process_index()),
                         self.eval_fn.replicated)
    l1, mse, outputs, *feats = self.run((variables, key, self.inception), batch)
    valid = np.asarray(batch['valid'], bool)
    l1, mse = np.asarray(l1, np.float64)[:, valid], np.asarray(mse, np.float64)[:, valid]
    self.sums += np.stack([l1.sum(1), mse.sum(1)])
    self.count += int(valid.sum())
    if feats:
      feats = np.asarray(feats[0])[:, valid]
      self.stats = [fid.add_features(s, f) for s, f in zip(self.stats, feats)]
      for kept, f in zip(self.local_feats, feats):
        kept.append(f)
    return outputs

  def results(self) -> dict:
    names = self.names
    totals = runtime.sum_over_processes(np.concatenate([self.sums.ravel(), [self.count]]))
    sums, count = totals[:-1].reshape(self.sums.shape), max(int(totals[-1]), 1)
    metrics = {n: {'l1': float(sums[0, o] / count), 'rmse': float(np.sqrt(sums[1, o] / count))}
               for o, n in enumerate(names)}
    if self.inception is not None:
      all_feats = gather_rows(np.stack([np.concatenate(f) for f in self.local_feats]))
      stats = sum_stats_over_processes(self.stats)
      real_feats = self.real_feats
      if real_feats is None:  # computed in this pass: streamed like the outputs'
        real_feats, real_stats = all_feats[-1], stats[-1]
        save_real_features(self.real_path, self.fingerprint, real_feats)
      else:
        real_stats = fid.stats_of(real_feats)
      for name, scores in zip(names, fid_kid_scores(stats[:len(names)], all_feats[:len(names)],
                                                    real_stats, real_feats,
                                                    seed=self.config.seed)):
        metrics[name].update(scores)
    return {'metrics': metrics}


def evaluate(config, model, variables, **kwargs) -> dict:
  """runtime.evaluate of this task (split, step, workdir, writer, eval_fn)."""
  return runtime.evaluate(sys.modules[__name__], config, model, variables, **kwargs)


def output_kind(output: str) -> str:
  del output
  return OUTPUT_KIND


def best_value(results) -> float:
  """The ensemble's main metric (L1), or the branches' mean when they have different targets:
  what the 'best' checkpoint minimises."""
  key, _, _ = metrics_lib.MAIN_METRICS[OUTPUT_KIND]
  metrics = results['metrics']
  if 'ensemble' in metrics:
    return float(metrics['ensemble'][key])
  return float(np.mean([s[key] for s in metrics.values()]))


def progress_line(results) -> str:
  return ', '.join(f'{n} L1 {s["l1"]:.4f} RMSE {s["rmse"]:.4f}' +
                   (f' FID {s["fid"]:.2f} KIDx100 {s["kid"]:.4f}' if 'fid' in s else '')
                   for n, s in results['metrics'].items())


def preview_image(config, batch, outputs) -> np.ndarray:
  """Rows of: each input domain, the target, each output (first examples of a batch)."""
  outputs = np.asarray(jax.device_get(outputs))
  rows = []
  for i in range(min(config.train.num_previews, outputs.shape[1])):
    if 'valid' in batch and not batch['valid'][i]:
      continue
    panels = [(n, viz.to_uint8_image(batch[n][i])) for n in config.modalities]
    if has_ensemble(config):
      panels.append((f'{branch_targets(config)[0]} (target)',
                     viz.to_uint8_image(batch['target'][i])))
      panels += [(f'{n} out', viz.to_uint8_image(outputs[o, i]))
                 for o, n in enumerate(output_names(config))]
    else:  # every branch its own target
      for o, (n, target) in enumerate(zip(output_names(config), branch_targets(config))):
        panels += [(f'{target} (target)', viz.to_uint8_image(batch['target'][i][o])),
                   (f'{n} out', viz.to_uint8_image(outputs[o, i]))]
    rows.append(viz.captioned_row(panels))
  return np.concatenate(rows, axis=0) if rows else np.zeros((1, 1, 3), np.uint8)


# ----------------------------------------------------------------------------- main.py modes

def summary(config) -> list[str]:
  """Parameter counts of G and D and the generator's forward GFLOPs, from shapes only."""
  model = build(config, axis_name=None)
  x = jax.ShapeDtypeStruct((len(branches_lib.inputs(config)), 1) + image_shape(config),
                           jnp.float32)
  variables = jax.eval_shape(lambda: init_variables(config, model, jax.random.key(0)))
  g_vars = {'params': variables['params']['generator'],
            'batch_stats': variables['batch_stats']['generator']}
  forward = jax.jit(lambda v, x: model.generator.apply(v, x, train=False, deterministic=True))
  cost = forward.lower(g_vars, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  size = config.data.crop_size
  if is_mit(config):
    arch = config.model.backbone[len('mit_'):]
    networks = f'MiT generator gen_{arch}, discriminator dis_{arch}'
  else:
    networks = (f'pix2pix generator ngf {config.model.ngf}, discriminator ndf '
                f'{config.model.ndf}')
  return [f'model: {config.model.fusion} {networks}, branches '
          f'{[b.name for b in branches_lib.of_config(config)]}, input {size}x{size}',
          f'params: {models.count_params(variables["params"]["generator"])}',
          f'discriminator params: {models.count_params(variables["params"]["discriminator"])}',
          f'gflops: {cost["flops"] / 1e9:.2f}']


def _network_variables(variables, net: str) -> dict:
  return {'params': variables['params'][net], 'batch_stats': variables['batch_stats'][net]}


def is_mit(config) -> bool:
  return config_lib.translation_family(config.model) == 'mit'


# (import, export) of each network's official state_dict: CEN's pix2pix (torch_io) or
# TokenFusion's MiT translation networks (tokenfusion_io).
CHECKPOINT_FORMATS = {
    'unet': {'generator': (torch_io.import_generator, torch_io.export_generator),
             'discriminator': (torch_io.import_discriminator, torch_io.export_discriminator)},
    'mit': {'generator': (tokenfusion_io.import_translation_generator,
                          tokenfusion_io.export_translation_generator),
            'discriminator': (tokenfusion_io.import_translation_discriminator,
                              tokenfusion_io.export_translation_discriminator)},
}


def import_torch_variables(config, model, generator_path: str,
                           discriminator_path: str = '') -> dict:
  """Variables from the official checkpoint-gen.pkl (and checkpoint-dis.pkl; without it the
  discriminator keeps its fresh initialisation): CEN's pix2pix, or with a MiT backbone
  TokenFusion's translation networks."""
  formats = CHECKPOINT_FORMATS[config_lib.translation_family(config.model)]
  variables = jax.device_get(init_variables(config, model, jax.random.key(config.seed)))
  paths = {'generator': generator_path, 'discriminator': discriminator_path}
  nets = {net: (torch_io.read_into(paths[net], formats[net][0], _network_variables(variables, net))
                if paths[net] else _network_variables(variables, net)) for net in NETS}
  return {c: {net: nets[net][c] for net in NETS} for c in ('params', 'batch_stats')}


def export_torch(state, output: str) -> list[str]:
  """The official checkpoint-gen.pkl and checkpoint-dis.pkl (plain state_dicts; TokenFusion's
  with the DataParallel 'module.' prefix) in `output`."""
  state = jax.device_get(state)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  family = 'mit' if 'patch_embed_enc_0' in variables['params']['generator'] else 'unet'
  paths = [os.path.join(output, 'checkpoint-gen.pkl'), os.path.join(output, 'checkpoint-dis.pkl')]
  for net, path in zip(NETS, paths):
    export = CHECKPOINT_FORMATS[family][net][1]
    torch_io.save_state_dict(path, export(_network_variables(variables, net)))
  return paths


def predict(config, model, variables, inputs, output, *, save_logits=False) -> list:
  """Translate one image per input domain (or the matching files of one folder per domain):
  writes <stem>_<output>.png for every branch and the ensemble, and with save_logits the raw
  generator outputs <stem>_<output>.npy (float32 [S, S, 3] in [-1, 1]). Inputs are read as the
  dataset's files (Taskonomy: the official per-domain preprocessing) and resized to crop_size
  as in evaluation."""
  if all(os.path.isdir(p) for p in inputs):
    examples = image_files.match_folders(config.modalities, inputs)
  else:
    examples = [(os.path.splitext(os.path.basename(inputs[0]))[0], list(inputs))]
  forward = compile_cache.CachedJit(functools.partial(generate, model=model, config=config),
                                    config)
  size = int(config.data.crop_size)
  written = []
  for stem, paths in examples:
    x = np.stack([translation_data.to_unit_range(translation_data.resize(
        translation_data.file_to_stored(config, name, image_files.read_image(path, name)),
        size))
        for name, path in zip(config.modalities, paths)])
    x = x[np.asarray([config.modalities.index(n) for n in branches_lib.inputs(config)])][:, None]
    outputs = np.asarray(jax.device_get(forward(variables, x, eval_key(config, 0))))
    for o, name in enumerate(output_names(config)):
      image_path = os.path.join(output, f'{stem}_{name}.png')
      viz.save_png(image_path, viz.to_uint8_image(outputs[o, 0]))
      written.append(image_path)
      if save_logits:
        written.append(image_files.save_npy(os.path.join(output, f'{stem}_{name}.npy'),
                                            np.asarray(outputs[o, 0], np.float32)))
  return written
