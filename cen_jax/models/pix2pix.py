"""The CEN image-to-image translation networks (official yikaiw/CEN image2image_translation).

- `Generator`: pix2pix U-Net on branch-stacked inputs [M, N, S, S, 3]. Convolutions are shared
  by all branches, every InstanceNorm is private ([M, C]); with fusion 'cen' each encoder
  norm (conv2 .. conv(N-1)) is followed by the channel exchange reading its own scales.
  Branch outputs are combined by the learned late ensemble (softmax(alpha)).
- `Discriminator`: 70x70-style PatchGAN shared by all branches (shared convs and one shared
  InstanceNorm per block), scoring concat(input_m, image_m) for each branch m.

Module and parameter names are the official ones (conv1..convN / 'conv' / 'insnorm_conv',
deconv1..deconvN / 'deconv' / 'insnorm_deconv', 'alpha'; D: conv1..conv5 / 'conv' /
'insnorm'), so the torch key map (cen_jax/torch_io.py) is mechanical. The official blocks
create InstanceNorm parameters they never apply (G: conv1, convN, deconvN; D: conv1, conv5):
they exist here too (created at init, never applied) so official checkpoints load strictly
and the parameter count is the official one.

Normalisation always uses instance statistics: the official code never puts G or D in eval
mode. The tracked running statistics are updated when `train=True` and are otherwise unused.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cen_jax.fusion import ops as fusion_ops
from cen_jax.fusion import registry
from cen_jax.layers import InstanceNorm, PrivateInstanceNorm, SharedConv, SharedConvTranspose

WEIGHT_STD = 0.02  # official normal_weight_init: conv and deconv kernels ~ N(0, 0.02)


def leaky_relu(x):
  return nn.leaky_relu(x, 0.2)


def encoder_widths(ngf: int, num_downs: int) -> list[int]:
  """Output width of conv1..convN: ngf * min(2^(k-1), 8)."""
  return [ngf * min(2 ** k, 8) for k in range(num_downs)]


def _conv(features, stride, dtype, name):
  return SharedConv(features, 4, stride, 1, use_bias=True, dtype=dtype,
                    kernel_init=nn.initializers.normal(WEIGHT_STD), name=name)


def _deconv(features, dtype, name):
  return SharedConvTranspose(features, 4, 2, 1, use_bias=True, dtype=dtype,
                             kernel_init=nn.initializers.normal(WEIGHT_STD), name=name)


class ConvBlock(nn.Module):
  """[leaky_relu(0.2)] -> shared conv 4x4 -> [private IN -> exchange]."""
  features: int
  activation: bool
  instance_norm: bool
  norm: dict  # PrivateInstanceNorm settings
  fusion: str  # a registered fusion (cen_jax/fusion/registry.py), applied at its point 'norm'
  threshold: float
  dtype: Any = jnp.float32
  index: int = 0  # encoder level (0-based)
  num_blocks: int = 1
  fusion_options: tuple = ()

  @nn.compact
  def __call__(self, x):
    if self.activation:
      x = leaky_relu(x)
    out = _conv(self.features, 2, self.dtype, 'conv')(x)
    norm = PrivateInstanceNorm(**self.norm, dtype=self.dtype, name='insnorm_conv')
    if self.instance_norm:
      out = norm(out)
      site = registry.Site(self.name, 0, self.index, self.num_blocks, self.threshold,
                          dict(self.fusion_options), scale=norm.variables['params']['scale'])
      out, _ = registry.apply_point(registry.get(self.fusion), 'norm', out, site, {})
    elif self.is_initializing():
      norm(out)  # official parameters that are never applied
    return out


class DeconvBlock(nn.Module):
  """relu -> shared transposed conv 4x4 stride 2 -> [private IN] -> [dropout 0.5]."""
  features: int
  instance_norm: bool
  dropout: float  # 0: none
  norm: dict
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    out = _deconv(self.features, self.dtype, 'deconv')(nn.relu(x))
    norm = PrivateInstanceNorm(**self.norm, dtype=self.dtype, name='insnorm_deconv')
    if self.instance_norm:
      out = norm(out)
    elif self.is_initializing():
      norm(out)  # official parameters that are never applied
    if self.dropout > 0:
      # One mask over the stacked [M, ...] tensor: independent per branch, as
      # ModuleParallel(nn.Dropout) draws one mask per branch.
      out = nn.Dropout(self.dropout, deterministic=deterministic)(out)
    return out


class ConvBlockShare(nn.Module):
  """[leaky_relu(0.2)] -> shared conv 4x4 -> [shared IN, applied to each branch in turn]."""
  features: int
  stride: int
  activation: bool
  instance_norm: bool
  norm: dict  # InstanceNorm settings
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.activation:
      x = leaky_relu(x)
    out = _conv(self.features, self.stride, self.dtype, 'conv')(x)
    norm = InstanceNorm(**self.norm, dtype=self.dtype, name='insnorm')
    if self.instance_norm:
      out = jnp.stack([norm(out[m]) for m in range(out.shape[0])])
    elif self.is_initializing():
      norm(out[0])  # official parameters that are never applied
    return out


class Generator(nn.Module):
  """Multimodal pix2pix U-Net with CEN exchange.

  Input `[M, N, S, S, 3]` (S divisible by 2^num_downs), output dict:
    'branches': float32 [M, N, S, S, 3] tanh images, one per input modality,
    'ensemble': float32 [N, S, S, 3] = sum_m softmax(alpha)_m * stop_gradient(branches[m]),
    'alpha': float32 [M] softmax(alpha).
  `train=True` updates the running statistics (mutable 'batch_stats'); `deterministic=False`
  applies dropout (rng 'dropout').

  The official LeakyReLU is in place and rewrites the stored encoder outputs when the next
  conv reads them, so the U-Net skips carry leaky_relu(enc_k), not enc_k; reproduced here.
  (Every skip is read only by the next DeconvBlock's ReLU, and relu(leaky_relu(e)) = relu(e),
  so this changes neither values nor gradients; it is kept so the graph reads as the official.)
  """
  ngf: int = 64
  num_downs: int = 8
  fusion: str = 'cen'
  threshold: float = 1e-2
  dropout: float = 0.5
  in_momentum: float = 0.1
  in_eps: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  out_channels: int = 3
  fusion_options: tuple = ()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, deterministic: bool) -> dict:
    registry.check_translation(registry.get(self.fusion), x.shape[0])
    if self.num_downs < 3:
      raise ValueError(f'config.model.num_downs={self.num_downs}: the U-Net needs at least 3')
    size = x.shape[-3:-1]
    if x.ndim != 5 or any(s % 2 ** self.num_downs for s in size):
      raise ValueError(f'Generator input {x.shape}: expected [M, N, S, S, C] with S divisible '
                       f'by 2^num_downs = {2 ** self.num_downs}')
    num_branches, depth = x.shape[0], self.num_downs
    norm = dict(use_running_average=False, update_stats=train, momentum=self.in_momentum,
                epsilon=self.in_eps, axis_name=self.axis_name)
    widths = encoder_widths(self.ngf, depth)

    skips = []
    out = x
    for k in range(1, depth + 1):
      out = ConvBlock(widths[k - 1], activation=k > 1, instance_norm=1 < k < depth, norm=norm,
                      fusion=self.fusion, threshold=self.threshold, dtype=self.dtype,
                      index=k - 1, num_blocks=depth, fusion_options=self.fusion_options,
                      name=f'conv{k}')(out)
      # The next conv's in-place LeakyReLU rewrites the stored output (official).
      skips.append(leaky_relu(out))
    for k in range(1, depth + 1):
      last = k == depth
      features = self.out_channels if last else widths[depth - k - 1]
      dropout = self.dropout if k <= 3 and not last else 0.0
      out = DeconvBlock(features, instance_norm=not last, dropout=dropout, norm=norm,
                        dtype=self.dtype, name=f'deconv{k}')(out, deterministic)
      if not last:
        out = jnp.concatenate([out, skips[depth - k - 1].astype(out.dtype)], axis=-1)

    images = jnp.tanh(out.astype(jnp.float32))
    alpha = self.param('alpha', nn.initializers.ones, (num_branches,))
    ensemble, weights = fusion_ops.late_ensemble(images, alpha)
    return {'branches': images, 'ensemble': ensemble, 'alpha': weights}


class Discriminator(nn.Module):
  """The official PatchGAN, shared by every branch: logits [M, N, h, w, 1] (h = S/8 - 2).

  Branch m scores concat(x[m], y[m]) on channels (input first). `y` may also be one image
  batch [N, S, S, C] for all branches (the official D(x, real_target)). Pre-sigmoid:
  sigmoid(logits) is the official output. The shared InstanceNorm of each block normalises
  the branches one after the other, so with `train=True` its running statistics receive M
  sequential updates per call, in branch order, as the official ModuleParallel does.
  """
  ndf: int = 64
  in_momentum: float = 0.1
  in_eps: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, *, train: bool,
               deterministic: bool = True) -> jax.Array:
    del deterministic  # the PatchGAN has no dropout (the MiT discriminator's interface)
    if y.ndim == x.ndim - 1:
      y = jnp.broadcast_to(y, (x.shape[0],) + y.shape)
    if x.ndim != 5 or x.shape[:-1] != y.shape[:-1]:
      raise ValueError(f'Discriminator inputs {x.shape} and {y.shape}: expected [M, N, S, S, C] '
                       f'each, with equal M, N, S')
    norm = dict(use_running_average=False, update_stats=train, momentum=self.in_momentum,
                epsilon=self.in_eps, axis_name=self.axis_name)
    out = jnp.concatenate([x.astype(self.dtype), y.astype(self.dtype)], axis=-1)
    blocks = ((self.ndf, 2, False), (self.ndf * 2, 2, True), (self.ndf * 4, 2, True),
              (self.ndf * 8, 1, True), (1, 1, False))
    for k, (features, stride, instance_norm) in enumerate(blocks, start=1):
      out = ConvBlockShare(features, stride, activation=k > 1, instance_norm=instance_norm,
                           norm=norm, dtype=self.dtype, name=f'conv{k}')(out)
    return out.astype(jnp.float32)
