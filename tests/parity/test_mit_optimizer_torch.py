"""The TokenFusion optimiser (config.train.optimizer = 'adamw', cen_jax/tasks/segmentation.py)
against torch.optim.AdamW driven as the official PolyWarmupAdamW (yikaiw/TokenFusion
semantic_segmentation/utils/optimizer.py) over the official WeTr.get_param_groups, restarted
per stage as the official main.py does: the same MiT-B0 parameters, the same gradients, two
stages of four steps, every parameter compared after every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import config as config_lib
from cen_jax import tokenfusion_io
from cen_jax.runtime import TrainState
from cen_jax.tasks import segmentation

torch = pytest.importorskip('torch')
from tests.helpers import torch_reference_mit as ref  # noqa: E402  (needs torch)

WARMUP, MAX_ITER, RATIO = 3, 10, 1e-6
LRS = (6e-3, 3e-3)  # larger than the official 6e-5 / 3e-5 so that every step moves visibly
STEPS_PER_STAGE = 4


class PolyWarmupAdamW(torch.optim.AdamW):
  """The official optimiser's rule: before each step, every group's lr is its initial lr times
  1 - (1 - k / warmup) (1 - ratio) during the warm-up, then (1 - k / max_iter) ** power."""

  def __init__(self, groups, warmup, max_iter, ratio, power=1.0):
    super().__init__(groups, betas=(0.9, 0.999), eps=1e-8)
    self.k, self.warmup, self.max_iter, self.ratio, self.power = 0, warmup, max_iter, ratio, power
    self.initial = [g['lr'] for g in self.param_groups]

  def step(self, closure=None):
    if self.k < self.warmup:
      factor = 1 - (1 - self.k / self.warmup) * (1 - self.ratio)
    elif self.k < self.max_iter:
      factor = (1 - self.k / self.max_iter) ** self.power
    else:
      factor = None
    if factor is not None:
      for group, lr in zip(self.param_groups, self.initial):
        group['lr'] = lr * factor
    super().step(closure)
    self.k += 1


def official_groups(model, lr):
  """WeTr.get_param_groups: encoder params without / with 'norm' in their name, decoder;
  weight decay 0.01, 0, 0.01; the decoder at 10x lr. alpha is in none."""
  enc = [p for n, p in model.encoder.named_parameters() if 'norm' not in n]
  norm = [p for n, p in model.encoder.named_parameters() if 'norm' in n]
  return [{'params': enc, 'lr': lr, 'weight_decay': 0.01},
          {'params': norm, 'lr': lr, 'weight_decay': 0.0},
          {'params': list(model.decoder.parameters()), 'lr': 10 * lr, 'weight_decay': 0.01}]


def adamw_config():
  config = config_lib.base_config()
  config.model.backbone = 'mit_b0'
  config.model.fusion = 'tokenfusion'
  t = config.train
  t.optimizer = 'adamw'
  t.stage_epochs = (STEPS_PER_STAGE, STEPS_PER_STAGE)
  t.lr_enc = LRS
  t.lr_dec = tuple(10 * lr for lr in LRS)
  t.wd_enc = t.wd_dec = 0.01
  t.warmup_steps, t.warmup_ratio, t.poly_steps, t.poly_power = WARMUP, RATIO, MAX_ITER, 1.0
  return config


def test_adamw_matches_the_official_poly_warmup_adamw_over_two_stages():
  torch.manual_seed(0)
  model = ref.WeTr('mit_b0', 40)
  state_dict = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  shapes = jax.eval_shape(lambda: segmentation.build_model(adamw_config()).init(
      jax.random.key(0), jnp.zeros((2, 1, 32, 32, 3)), train=False))
  variables = tokenfusion_io.import_tokenfusion(state_dict, shapes)
  config = adamw_config()
  tx = segmentation.make_optimizer(config)
  starts = segmentation.stage_starts(config, steps_per_epoch=1)
  update = jax.jit(lambda state, grads: segmentation.adamw_update(config, starts, tx, state,
                                                                  grads))
  rng = np.random.RandomState(0)
  state = TrainState(jnp.zeros((), jnp.int32), variables['params'], variables['batch_stats'],
                     tx.init(variables['params']))
  names = dict(model.named_parameters())
  for stage, lr in enumerate(LRS):
    optimizer = PolyWarmupAdamW(official_groups(model, lr), WARMUP, MAX_ITER, RATIO)
    state = state.replace(opt_state=tx.init(state.params))  # the runner's reset per stage
    for _ in range(STEPS_PER_STAGE):
      grads = jax.tree.map(lambda p: rng.randn(*p.shape).astype(np.float32), state.params)
      exported = tokenfusion_io.export_tokenfusion(
          {'params': grads, 'batch_stats': variables['batch_stats']}, prefix='')
      for name, p in names.items():
        p.grad = torch.from_numpy(np.ascontiguousarray(exported[name]))
      optimizer.step()
      params, opt_state, lr_enc, lr_dec = update(state, grads)
      state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
      assert float(lr_enc) == pytest.approx(optimizer.param_groups[0]['lr'], rel=1e-6)
      assert float(lr_dec) == pytest.approx(optimizer.param_groups[2]['lr'], rel=1e-6)
      ours = tokenfusion_io.export_tokenfusion(
          {'params': jax.device_get(state.params), 'batch_stats': variables['batch_stats']},
          prefix='')
      for name, p in names.items():  # atol: 1.7e-5 of the largest step (6e-2)
        np.testing.assert_allclose(ours[name], p.detach().numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=f'stage {stage}, step {int(state.step)}: {name}')
  assert int(state.step) == 2 * STEPS_PER_STAGE
  np.testing.assert_array_equal(state.params['alpha'], variables['params']['alpha'])  # frozen
