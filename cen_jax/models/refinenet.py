"""Light-Weight RefineNet decoder and the multimodal segmenter (the official CEN network).

Module names follow the official PyTorch model (`p_ims1d2_outl1_dimred`, `adapt_stage1_b`,
`mflow_conv_g1_pool`, `1_conv`, ...) so checkpoint keys map one to one.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cen_jax.layers import SharedConv, max_pool, resize
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

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict:
    num_branches = x.shape[0]
    norm = dict(use_running_average=(not train) or self.frozen_bn, momentum=self.bn_momentum,
                epsilon=self.bn_eps, axis_name=self.axis_name)
    l1, l2, l3, l4 = ResNetEncoder(self.blocks, norm, self.stem_width, self.widths, self.fusion,
                                   self.threshold, dtype=self.dtype, name='encoder')(x)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    l4, l3 = drop(l4), drop(l3)
    wide, narrow = self.decoder_widths
    dt = self.dtype
    rcu = lambda f, n, name: RCUBlock(f, n, dtype=dt, name=name)
    crp = lambda f, name: CRPBlock(f, dtype=dt, name=name)
    up = lambda y, like: resize(y, like.shape[-3:-1], 'bilinear_align_corners')

    x4 = conv3x3(wide, 'p_ims1d2_outl1_dimred', dtype=dt)(l4)
    x4 = nn.relu(rcu(wide, 2, 'adapt_stage1_b')(x4))
    x4 = crp(wide, 'mflow_conv_g1_pool')(x4)
    x4 = rcu(wide, 3, 'mflow_conv_g1_b')(x4)
    x4 = up(conv3x3(narrow, 'mflow_conv_g1_b3_joint_varout_dimred', dtype=dt)(x4), l3)

    x3 = conv3x3(narrow, 'p_ims1d2_outl2_dimred', dtype=dt)(l3)
    x3 = rcu(narrow, 2, 'adapt_stage2_b')(x3)
    x3 = conv3x3(narrow, 'adapt_stage2_b2_joint_varout_dimred', dtype=dt)(x3)
    x3 = crp(narrow, 'mflow_conv_g2_pool')(nn.relu(x3 + x4))
    x3 = rcu(narrow, 3, 'mflow_conv_g2_b')(x3)
    x3 = up(conv3x3(narrow, 'mflow_conv_g2_b3_joint_varout_dimred', dtype=dt)(x3), l2)

    x2 = conv3x3(narrow, 'p_ims1d2_outl3_dimred', dtype=dt)(l2)
    x2 = rcu(narrow, 2, 'adapt_stage3_b')(x2)
    x2 = conv3x3(narrow, 'adapt_stage3_b2_joint_varout_dimred', dtype=dt)(x2)
    x2 = crp(narrow, 'mflow_conv_g3_pool')(nn.relu(x2 + x3))
    x2 = rcu(narrow, 3, 'mflow_conv_g3_b')(x2)
    x2 = up(conv3x3(narrow, 'mflow_conv_g3_b3_joint_varout_dimred', dtype=dt)(x2), l1)

    x1 = conv3x3(narrow, 'p_ims1d2_outl4_dimred', dtype=dt)(l1)
    x1 = rcu(narrow, 2, 'adapt_stage4_b')(x1)
    x1 = conv3x3(narrow, 'adapt_stage4_b2_joint_varout_dimred', dtype=dt)(x1)
    x1 = crp(narrow, 'mflow_conv_g4_pool')(nn.relu(x1 + x2))
    x1 = drop(rcu(narrow, 3, 'mflow_conv_g4_b')(x1))

    logits = conv3x3(self.num_classes, 'clf_conv', use_bias=True, dtype=dt)(x1)
    logits = logits.astype(jnp.float32)
    alpha = self.param('alpha', nn.initializers.ones, (num_branches,))
    weights = jax.nn.softmax(alpha)
    detached = jax.lax.stop_gradient(logits)
    ensemble = weights[0] * detached[0]
    for m in range(1, num_branches):
      ensemble = ensemble + weights[m] * detached[m]
    return {'branches': logits, 'ensemble': ensemble, 'alpha': weights}
