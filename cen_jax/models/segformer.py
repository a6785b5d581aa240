"""The SegFormer all-MLP decoder and the official TokenFusion RGB-D segmenter (`WeTr`).

From yikaiw/TokenFusion semantic_segmentation/models/segformer.py: the MiT encoder
(cen_jax/models/mit.py) gives four stage features per branch; ONE SegFormer head decodes each
branch; a learned late ensemble sums the branch logits weighted by softmax(alpha).

The head's convolutions and Linears are shared, so they run once over all branches (M folded
into the batch). Its BatchNorm (mmcv ConvModule 'BN' in `linear_fuse`) is shared too, not
private: the official calls the head once per branch, so in training each branch is normalised
by its own batch statistics and the running statistics are updated once per branch, branch 0
first (`per_branch_batch_norm`). The official recipe trains with FREEZE_BN = True, i.e. this
BatchNorm in eval mode (running statistics, never updated): `frozen_bn=True`, the default.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cen_jax.fusion import ops
from cen_jax.layers import (BatchNorm, SharedConv, fold, resize, torch_conv_bias_init,
                            torch_conv_kernel_init, unfold)
from cen_jax.models import mit as mit_lib


def per_branch_batch_norm(bn: BatchNorm, x: jax.Array) -> jax.Array:
  """One BatchNorm module (torch semantics, `layers.BatchNorm`) applied to [M, N, H, W, C] as
  the official head applies it, once per branch: in training every branch is normalised with
  its own batch statistics and the running statistics take M momentum updates, branch 0
  first (each call reads the statistics the previous one wrote). With running averages all
  branches are one op."""
  if bn.use_running_average:
    return unfold(bn(fold(x)), x.shape[0])
  return jnp.stack([bn(x[m]) for m in range(x.shape[0])])


class LinearEmbed(nn.Module):
  """The official `MLP`: a Linear (torch default init) on every pixel."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    return nn.Dense(self.features, dtype=self.dtype, kernel_init=torch_conv_kernel_init,
                    bias_init=torch_conv_bias_init(fan_in), name='proj')(x)


class ConvModule(nn.Module):
  """mmcv ConvModule(k=1, norm 'BN'): 1x1 conv without bias (kaiming normal, fan_out), BN,
  ReLU. Module names 'conv' and 'bn' as the official keys."""
  features: int
  norm: dict  # BatchNorm settings (use_running_average, momentum, epsilon, axis_name)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
    x = SharedConv(self.features, 1, dtype=self.dtype, kernel_init=init, name='conv')(x)
    x = per_branch_batch_norm(BatchNorm(**self.norm, dtype=self.dtype, name='bn'), x)
    return nn.relu(x)


class SegFormerHead(nn.Module):
  """linear_c1..c4 to `embedding_dim`, upsampled (bilinear, align_corners=False) to the stride-4
  size, concatenated c4, c3, c2, c1, linear_fuse (1x1 conv + BN + ReLU), Dropout2d, linear_pred.
  Input: the four [M, N, H_s, W_s, C_s]; output logits [M, N, H_1, W_1, num_classes]."""
  num_classes: int
  norm: dict  # linear_fuse's BatchNorm settings (use_running_average, momentum, ...)
  embedding_dim: int = 256
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, *, train: bool) -> jax.Array:
    size = features[0].shape[-3:-1]
    embedded = []
    for s in (4, 3, 2, 1):
      y = LinearEmbed(self.embedding_dim, dtype=self.dtype, name=f'linear_c{s}')(features[s - 1])
      embedded.append(resize(y, size, 'bilinear'))
    x = ConvModule(self.embedding_dim, self.norm, dtype=self.dtype,
                   name='linear_fuse')(jnp.concatenate(embedded, axis=-1))
    # Dropout2d: whole channels, drawn per branch and sample (the head runs once per branch).
    x = nn.Dropout(self.dropout, broadcast_dims=(2, 3), deterministic=not train)(x)
    return SharedConv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                      name='linear_pred')(x)


class TokenFusionSegmenter(nn.Module):
  """The official TokenFusion segmenter (WeTr): MiT encoder + SegFormer head + late ensemble.

  Input: `[M, N, H, W, 3]`, branch m = modality m. Output dict:
    'branches': float32 [M, N, h, w, K] logits at stride 4 (h = H_1, the patch_embed1 size),
    'ensemble': float32 [N, h, w, K] = sum_m softmax(alpha)_m * stop_gradient(branches[m]),
    'alpha': float32 [M] softmax(alpha),
    'masks': the token scores of every encoder block [M, N, H_s, W_s] (`ops.mask_l1` is the
      official penalty); empty unless the fusion asks for token scores (tokenfusion).
  Parameters: 'encoder' (MiT), 'decoder' (SegFormerHead), 'alpha' [M] (ones), the official
  module names; `drop_path_rate` is fixed at 0.1 by the official mit_bX classes. The official
  optimiser holds no alpha (WeTr.get_param_groups: encoder and decoder only), so there the
  ensemble stays the plain mean (tokenfusion_io.official_param_group).
  """
  num_classes: int
  backbone: str = 'mit_b1'  # the official main.py default
  embedding_dim: int = 256
  fusion: str = 'tokenfusion'  # a registered fusion that fits the MiT
  threshold: float = mit_lib.MASK_THRESHOLD
  drop_path_rate: float = 0.1
  dropout: float = 0.1
  frozen_bn: bool = True  # official FREEZE_BN: decoder BN in eval mode while training
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  fusion_options: tuple = ()  # config.model.fusion_options as (key, value) pairs
  embed_dims: tuple = ()  # overrides the backbone's (small test and demo networks)
  depths: tuple = ()
  sr_ratios: tuple = ()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict:
    arch = {k: tuple(v) for k, v in (('embed_dims', self.embed_dims), ('depths', self.depths),
                                     ('sr_ratios', self.sr_ratios)) if v}
    encoder = mit_lib.mit(self.backbone, fusion=self.fusion, threshold=self.threshold,
                          drop_path_rate=self.drop_path_rate, dtype=self.dtype,
                          fusion_options=self.fusion_options, name='encoder', **arch)
    features, masks = encoder(x, train=train)
    norm = dict(use_running_average=(not train) or self.frozen_bn, momentum=self.bn_momentum,
                epsilon=self.bn_eps, axis_name=self.axis_name)
    logits = SegFormerHead(self.num_classes, norm, self.embedding_dim, self.dropout,
                           dtype=self.dtype, name='decoder')(features, train=train)
    logits = logits.astype(jnp.float32)
    alpha = self.param('alpha', nn.initializers.ones, (x.shape[0],))
    ensemble, weights = ops.late_ensemble(logits, alpha)
    return {'branches': logits, 'ensemble': ensemble, 'alpha': weights, 'masks': masks}
