"""Multimodal ResNet (torchvision v1.5 layout) on branch-stacked tensors [M, N, H, W, C].

Convolutions are shared by all branches (`SharedConv`); every norm is private (`[M, C]`
parameters and statistics). The fusion hook sits in the bottleneck:
- 'cen': exchange after bn2 of every bottleneck, reading bn2's own scales (papers.md §1.1(d)).
- 'asymfusion': channel shuffle / pixel shift in the last bottleneck of each stage (§3.2).
- 'none': shared convs + private norms only.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cen_jax import fusion as fusion_ops
from cen_jax.layers import PrivateBatchNorm, SharedConv, max_pool

FUSIONS = ('cen', 'asymfusion', 'none')
EXPANSION = 4


class Bottleneck(nn.Module):
  planes: int
  stride: int
  downsample: bool
  norm: dict  # PrivateBatchNorm settings (use_running_average, momentum, epsilon, axis_name)
  fusion: str = 'none'  # 'cen' | 'asymfusion' | 'none' for this block
  threshold: float = 2e-2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    num_branches = x.shape[0]
    conv = lambda f, k, s, p, name: SharedConv(f, k, s, p, dtype=self.dtype, name=name)
    norm = lambda name: PrivateBatchNorm(**self.norm, dtype=self.dtype, name=name)
    asym = self.fusion == 'asymfusion' and num_branches == 2

    out = nn.relu(norm('bn1')(conv(self.planes, 1, 1, 0, 'conv1')(x)))
    if asym:
      shift = fusion_ops.pixel_shift(out)  # from the pre-shuffle features
      out = fusion_ops.channel_shuffle(out)
    bn2 = norm('bn2')
    out = bn2(conv(self.planes, 3, self.stride, 1, 'conv2')(out))
    if self.fusion == 'cen':
      out = fusion_ops.exchange(out, bn2.variables['params']['scale'], self.threshold)
    out = nn.relu(out)
    if asym:
      out = out + shift[::-1]  # each branch receives the other's shifted features
      out = fusion_ops.channel_shuffle(out)
    out = norm('bn3')(conv(self.planes * EXPANSION, 1, 1, 0, 'conv3')(out))
    residual = x
    if self.downsample:
      residual = conv(self.planes * EXPANSION, 1, self.stride, 0, 'downsample_conv')(x)
      residual = norm('downsample_bn')(residual)
    return nn.relu(out + residual)


class ResNetEncoder(nn.Module):
  """Returns the four stage outputs (strides 4, 8, 16, 32)."""
  blocks: Sequence[int]
  norm: dict
  stem_width: int = 64
  widths: Sequence[int] = (64, 128, 256, 512)
  fusion: str = 'cen'
  threshold: float = 2e-2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    if self.fusion not in FUSIONS:
      raise ValueError(f'config.model.fusion={self.fusion!r}: expected one of {FUSIONS}')
    if self.fusion == 'asymfusion' and x.shape[0] > 2:
      raise ValueError(f'AsymFusion is defined for 2 modalities, got {x.shape[0]}')
    x = SharedConv(self.stem_width, 7, 2, 3, dtype=self.dtype, name='conv1')(x)
    x = nn.relu(PrivateBatchNorm(**self.norm, dtype=self.dtype, name='bn1')(x))
    x = max_pool(x, 3, 2, 1)
    in_features = self.stem_width
    outputs = []
    for stage, (num_blocks, planes) in enumerate(zip(self.blocks, self.widths)):
      for i in range(num_blocks):
        stride = 2 if (i == 0 and stage > 0) else 1
        downsample = i == 0 and (stride != 1 or in_features != planes * EXPANSION)
        if self.fusion == 'asymfusion':  # official: last block of a stage, never block 0
          block_fusion = 'asymfusion' if (i >= 1 and i == num_blocks - 1) else 'none'
        else:
          block_fusion = self.fusion
        x = Bottleneck(planes, stride, downsample, self.norm, block_fusion, self.threshold,
                       dtype=self.dtype, name=f'layer{stage + 1}_{i}')(x)
        in_features = planes * EXPANSION
      outputs.append(x)
    return outputs
