"""Multimodal ResNet (torchvision v1.5 layout) on branch-stacked tensors [M, N, H, W, C].

Convolutions are shared by all branches (`SharedConv`); every norm is private (`[M, C]`
parameters and statistics). The bottleneck hands its activations to the configured fusion
(cen_jax/fusion/registry.py) at its points 'bn1', 'act1', 'bn2', 'act2' and 'output':
- 'cen': exchange after bn2 of every bottleneck, reading bn2's own scales (docs/papers.md §1.1(d)).
- 'asymfusion': channel shuffle / pixel shift in the last bottleneck of each stage (§3.2).
- 'none': shared convs + private norms only.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cen_jax.fusion import registry
from cen_jax.layers import PrivateBatchNorm, SharedConv, max_pool, remat

EXPANSION = 4


class Bottleneck(nn.Module):
  planes: int
  stride: int
  downsample: bool
  norm: dict  # PrivateBatchNorm settings (use_running_average, momentum, epsilon, axis_name)
  fusion: str = 'none'  # a registered fusion (cen_jax/fusion/registry.py)
  threshold: float = 2e-2
  dtype: Any = jnp.float32
  stage: int = 0
  index: int = 0
  num_blocks: int = 1
  fusion_options: tuple = ()  # config.model.fusion_options as (key, value) pairs

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, s, p, name: SharedConv(f, k, s, p, dtype=self.dtype, name=name)
    norm = lambda name: PrivateBatchNorm(**self.norm, dtype=self.dtype, name=name)
    at = registry.BlockPoints(registry.get(self.fusion), registry.Site(
        self.name, self.stage, self.index, self.num_blocks, self.threshold,
        dict(self.fusion_options)))

    bn1 = norm('bn1')
    out = at('bn1', bn1(conv(self.planes, 1, 1, 0, 'conv1')(x)), bn1.variables['params']['scale'])
    out = at('act1', nn.relu(out))
    bn2 = norm('bn2')
    out = at('bn2', bn2(conv(self.planes, 3, self.stride, 1, 'conv2')(out)),
             bn2.variables['params']['scale'])
    out = at('act2', nn.relu(out))
    out = norm('bn3')(conv(self.planes * EXPANSION, 1, 1, 0, 'conv3')(out))
    residual = x
    if self.downsample:
      residual = conv(self.planes * EXPANSION, 1, self.stride, 0, 'downsample_conv')(x)
      residual = norm('downsample_bn')(residual)
    return at('output', nn.relu(out + residual))


class ResNetEncoder(nn.Module):
  """Returns the four stage outputs (strides 4, 8, 16, 32)."""
  blocks: Sequence[int]
  norm: dict
  stem_width: int = 64
  widths: Sequence[int] = (64, 128, 256, 512)
  fusion: str = 'cen'
  threshold: float = 2e-2
  dtype: Any = jnp.float32
  fusion_options: tuple = ()
  remat: str = 'none'  # what each bottleneck keeps for the backward pass (layers.REMAT_POLICIES)

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    registry.check_branches(registry.get(self.fusion), x.shape[0])
    x = SharedConv(self.stem_width, 7, 2, 3, dtype=self.dtype, name='conv1')(x)
    x = nn.relu(PrivateBatchNorm(**self.norm, dtype=self.dtype, name='bn1')(x))
    x = max_pool(x, 3, 2, 1)
    in_features = self.stem_width
    outputs = []
    block = remat(Bottleneck, self.remat)
    for stage, (num_blocks, planes) in enumerate(zip(self.blocks, self.widths)):
      for i in range(num_blocks):
        stride = 2 if (i == 0 and stage > 0) else 1
        downsample = i == 0 and (stride != 1 or in_features != planes * EXPANSION)
        x = block(planes, stride, downsample, self.norm, self.fusion, self.threshold,
                       dtype=self.dtype, stage=stage, index=i, num_blocks=num_blocks,
                       fusion_options=self.fusion_options, name=f'layer{stage + 1}_{i}')(x)
        in_features = planes * EXPANSION
      outputs.append(x)
    return outputs
