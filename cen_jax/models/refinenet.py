"""Light-Weight RefineNet decoder and the multimodal segmenter (the official CEN network).

Module names follow the official PyTorch model (`p_ims1d2_outl1_dimred`, `adapt_stage1_b`,
`mflow_conv_g1_pool`, `1_conv`, ...) so checkpoint keys map one to one.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cen_jax.fusion import ops
from cen_jax.fusion import registry
from cen_jax.layers import SharedConv, max_pool, remat, resize
from cen_jax.models.resnet import ResNetEncoder


def conv3x3(features, name, use_bias=False, dtype=jnp.float32):
  return SharedConv(features, 3, 1, 1, use_bias=use_bias, dtype=dtype, name=name)


class RCUBlock(nn.Module):
  """Residual conv units: `num_blocks` x [relu, conv(bias), relu, conv] + skip.

  The official ReLU is in place, so it also rewrites the tensor held as the skip: the skip
  of each unit is relu(x), not x. We reproduce that.
  """
  features: int
  num_blocks: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_blocks):
      x = nn.relu(x)
      residual = x
      x = conv3x3(self.features, f'{i + 1}_conv', use_bias=True, dtype=self.dtype)(x)
      x = nn.relu(x)
      x = conv3x3(self.features, f'{i + 1}_conv_relu_varout_dimred', dtype=self.dtype)(x)
      x = x + residual
    return x


class CRPBlock(nn.Module):
  """Chained residual pooling: `num_stages` x [maxpool 5x5, conv], each summed into x."""
  features: int
  num_stages: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    top = x
    for i in range(self.num_stages):
      top = max_pool(top, 5, 1, 2)
      top = conv3x3(self.features, f'{i + 1}_outvar_dimred', dtype=self.dtype)(top)
      x = x + top
    return x


class Segmenter(nn.Module):
  """Multimodal ResNet encoder + Light-Weight RefineNet decoder + learned late ensemble.

  Input: `[M, N, H, W, 3]`, branch m = modality m. Output dict:
    'branches': float32 [M, N, h, w, K] logits at stride 4 (h = ceil(ceil(H/2)/2) ...),
    'ensemble': float32 [N, h, w, K] = sum_m softmax(alpha)_m * stop_gradient(branches[m]),
    'alpha': float32 [M] softmax(alpha).
  With `heads` ((task, channels, branch indices), ...: the multitask scenarios,
  cen_jax/branches.py) every task has its own classifier `clf_conv_<task>` over its branches
  and its own ensemble weights `alpha_<task>`; the output is then
  {'tasks': {task: {'branches': [M_t, N, h, w, channels], 'ensemble', 'alpha'}}}.
  """
  num_classes: int
  blocks: Sequence[int]
  fusion: str = 'cen'
  threshold: float = 2e-2
  stem_width: int = 64
  widths: Sequence[int] = (64, 128, 256, 512)
  decoder_widths: Sequence[int] = (512, 256)
  dropout: float = 0.5
  frozen_bn: bool = True
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  fusion_options: tuple = ()  # config.model.fusion_options as (key, value) pairs
  heads: tuple = ()  # ((task, channels, (branch index, ...)), ...); () = one shared classifier
  remat: str = 'none'  # what the bottlenecks, RCU and CRP blocks keep for the backward pass

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict:
    fusion_name = self.fusion
    if registry.get(fusion_name).network == 'early':  # one branch on the concatenated inputs
      x = jnp.concatenate(list(x), axis=-1)[None]
      fusion_name = 'none'
    num_branches = x.shape[0]
    norm = dict(use_running_average=(not train) or self.frozen_bn, momentum=self.bn_momentum,
                epsilon=self.bn_eps, axis_name=self.axis_name)
    l1, l2, l3, l4 = ResNetEncoder(self.blocks, norm, self.stem_width, self.widths,
                                   fusion_name, self.threshold, dtype=self.dtype,
                                   fusion_options=self.fusion_options, remat=self.remat,
                                   name='encoder')(x)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    l4, l3 = drop(l4), drop(l3)
    wide, narrow = self.decoder_widths
    dt = self.dtype
    rcu, crp = remat(RCUBlock, self.remat), remat(CRPBlock, self.remat)

    x = conv3x3(wide, 'p_ims1d2_outl1_dimred', dtype=dt)(l4)
    x = nn.relu(rcu(wide, 2, dtype=dt, name='adapt_stage1_b')(x))
    x = crp(wide, dtype=dt, name='mflow_conv_g1_pool')(x)
    x = rcu(wide, 3, dtype=dt, name='mflow_conv_g1_b')(x)
    # Levels 2..4 (strides 16, 8, 4): project the coarser result, upsample it
    # (align_corners=True), add the adapted encoder feature, then relu, CRP and RCU.
    for level, skip in zip((2, 3, 4), (l3, l2, l1)):
      x = conv3x3(narrow, f'mflow_conv_g{level - 1}_b3_joint_varout_dimred', dtype=dt)(x)
      x = resize(x, skip.shape[-3:-1], 'bilinear_align_corners')
      y = conv3x3(narrow, f'p_ims1d2_outl{level}_dimred', dtype=dt)(skip)
      y = rcu(narrow, 2, dtype=dt, name=f'adapt_stage{level}_b')(y)
      y = conv3x3(narrow, f'adapt_stage{level}_b2_joint_varout_dimred', dtype=dt)(y)
      x = crp(narrow, dtype=dt, name=f'mflow_conv_g{level}_pool')(nn.relu(y + x))
      x = rcu(narrow, 3, dtype=dt, name=f'mflow_conv_g{level}_b')(x)
    x1 = drop(x)

    if self.heads:
      return {'tasks': {task: self.task_head(x1, task, channels, indices)
                        for task, channels, indices in self.heads}}
    logits = conv3x3(self.num_classes, 'clf_conv', use_bias=True, dtype=dt)(x1)
    logits = logits.astype(jnp.float32)
    alpha = self.param('alpha', nn.initializers.ones, (num_branches,))
    ensemble, weights = ops.late_ensemble(logits, alpha)
    return {'branches': logits, 'ensemble': ensemble, 'alpha': weights}

  def task_head(self, features, task, channels, indices) -> dict:
    """One task's classifier over its branches' features, and their late ensemble."""
    outputs = conv3x3(channels, f'clf_conv_{task}', use_bias=True, dtype=self.dtype)(
        features[jnp.asarray(indices)])
    outputs = outputs.astype(jnp.float32)
    alpha = self.param(f'alpha_{task}', nn.initializers.ones, (len(indices),))
    ensemble, weights = ops.late_ensemble(outputs, alpha)
    return {'branches': outputs, 'ensemble': ensemble, 'alpha': weights}


class SeparateBranches(nn.Module):
  """The 'separate' baseline: every branch its own single-branch network (nothing shared,
  nothing exchanged; parameters under branch0, branch1, ...), and the learned late ensemble
  over their outputs as in CEN. A loop rather than a vmap over stacked parameters: XLA:CPU
  runs vmapped (grouped) convolutions several times slower than M plain ones."""
  network: Any  # the module class (Segmenter or Generator)
  fields: dict  # its fields (fusion 'none')

  @nn.compact
  def __call__(self, x: jax.Array, **kwargs) -> dict:
    outs = [self.network(**self.fields, name=f'branch{m}')(x[m:m + 1], **kwargs)
            for m in range(x.shape[0])]
    outputs = jnp.concatenate([o['branches'] for o in outs])
    alpha = self.param('alpha', nn.initializers.ones, (x.shape[0],))
    ensemble, weights = ops.late_ensemble(outputs, alpha)
    return {'branches': outputs, 'ensemble': ensemble, 'alpha': weights}
