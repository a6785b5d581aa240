"""The official TokenFusion image-to-image translation networks (MiT generator and discriminator).

From yikaiw/TokenFusion image2image_translation/models/{model_pruning,model_cfg,modules}.py:
`MixVisionTransformerGen` (gen_b0..b5) and `MixVisionTransformerDis` (dis_b0..b5), on
branch-stacked tensors [M, N, S, S, C], built from the segmentation MiT's blocks
(cen_jax/models/mit.py: shared Linears / Convs, private LayerNorms eps 1e-6, per-branch score
nets, the same Block and Attention).

- Encoder (both networks): 5 stages; every stage's OverlapPatchEmbed is a 3x3 conv, stride 2,
  padding 1 (so 256 -> 128 -> ... -> 8), then blocks, then the stage's private norm_enc.
  num_heads (1, 2, 4, 8, 16), sr_ratios (16, 8, 4, 2, 1), mlp_ratio 4, qkv_bias in every arch.
- Generator, TokenFusion: one PredictorLG per encoder stage, run only before the LAST block of
  the stage (on that block's input); only that block scales its attention output by the scores
  and exchanges tokens under 0.02; the other blocks run with mask=None. Fusions go through the
  registry at the encoder points 'tokens' (Site.scores None in blocks without a predictor:
  `registry.token_fusion` then does nothing), 'norm2' and 'stage_end'. The decoder and the
  discriminator call no fusion point (the official exchanges only in the generator's encoder).
- Generator decoder: 4 stages, each a PatchUpsample (PixelShuffle(2), 1x1 conv C/4 -> the
  skip's width), plus the encoder skip, blocks without masks, norm_dec; then a last
  PatchUpsample, the 1x1 conv `project` to 3 channels and tanh; the late ensemble over
  stop_gradient(branches) weighted by softmax(alpha) (alpha init ones).
- Official quirks kept: every PatchUpsample creates a LayerNormParallel `norm` that its forward
  never applies; it exists here (created at init, never applied) so official checkpoints load
  strictly and parameter counts are the official ones. The decoder's stochastic-depth rates are
  dpr[cur_dec + i] with dpr = linspace(0, drop_path_rate, sum(all 5 depths)) and cur_dec counted
  from 0 over the decoder stages (depths[3], depths[2], ...): they rise from 0 at the deepest
  decoder stage and never reach drop_path_rate.
- The discriminator returns PRE-sigmoid logits [M, N, S/32, S/32, 1] (the official output is
  their sigmoid), as cen_jax/models/pix2pix.py's Discriminator.

Torch key names: cen_jax/tokenfusion_io.py (import_translation_generator, ...).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cen_jax.fusion import ops as fusion_ops
from cen_jax.fusion import registry
from cen_jax.models import mit as mit_lib
from cen_jax.models.mit import (LN_EPS, MASK_THRESHOLD, Block, Conv, OverlapPatchEmbed,
                                PrivateLayerNorm, PrivateScoreNet, token_scores)

NUM_HEADS = (1, 2, 4, 8, 16)
SR_RATIOS = (16, 8, 4, 2, 1)
MLP_RATIOS = (4, 4, 4, 4, 4)
_WIDE = (64, 128, 256, 512, 1024)
# Official model_cfg.gen_bX / dis_bX (the same sizes for both; qkv_bias True, drop_path 0.1).
TRANSLATION_ARCHS = {
    'b0': dict(embed_dims=(32, 64, 128, 256, 512), depths=(2, 2, 2, 2, 2)),
    'b1': dict(embed_dims=_WIDE, depths=(2, 2, 2, 2, 2)),
    'b2': dict(embed_dims=_WIDE, depths=(3, 4, 4, 6, 3)),
    'b3': dict(embed_dims=_WIDE, depths=(3, 4, 4, 18, 3)),
    'b4': dict(embed_dims=_WIDE, depths=(3, 8, 8, 27, 3)),
    'b5': dict(embed_dims=_WIDE, depths=(3, 6, 6, 40, 3)),
}
# The fusion the decoder blocks and the discriminator get: a registered fusion without points.
NO_FUSION = 'none'


def pixel_shuffle(x: jax.Array, factor: int = 2) -> jax.Array:
  """torch PixelShuffle on [..., H, W, C]: out[h*r + i, w*r + j, c] = in[h, w, c*r*r + i*r + j]."""
  *lead, h, w, c = x.shape
  r = factor
  x = x.reshape(*lead, h, w, c // (r * r), r, r)
  n = len(lead)
  x = jnp.transpose(x, tuple(range(n)) + (n, n + 3, n + 1, n + 4, n + 2))
  return x.reshape(*lead, h * r, w * r, c // (r * r))


class PatchUpsample(nn.Module):
  """Official PatchUpsample: PixelShuffle(2), shared 1x1 conv (C/4 -> features). Its private
  LayerNorm `norm` is created (official parameters) but never applied, as in the official
  forward."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv(self.features, 1, 1, 0, dtype=self.dtype, name='proj')(pixel_shuffle(x))
    if self.is_initializing():
      PrivateLayerNorm(LN_EPS, dtype=self.dtype, name='norm')(x)  # never applied (official)
    return x


def _check_input(what: str, x: jax.Array, depths) -> None:
  multiple = 2 ** len(depths)
  if x.ndim != 5 or x.shape[2] % multiple or x.shape[3] % multiple:
    raise ValueError(f'{what} input {x.shape}: expected [M, N, S, S, C] with S divisible by '
                     f'{multiple}')


def _encode(net, x, fusion: str, predictors: bool, train: bool):
  """The official 5-stage encoder inside the compact method of `net` (a MiTGenerator or
  MiTDiscriminator: its fields, its module names). Returns (stage outputs, score maps)."""
  found = registry.get(fusion)
  fusion_options = getattr(net, 'fusion_options', ())  # the discriminator has none
  options = dict(fusion_options)
  threshold = getattr(net, 'threshold', MASK_THRESHOLD)
  rates = np.linspace(0.0, net.drop_path_rate, sum(net.depths))
  skips, masks, cur = [], [], 0
  for s, depth in enumerate(net.depths):
    x = OverlapPatchEmbed(net.embed_dims[s], 3, 2, dtype=net.dtype,
                          name=f'patch_embed_enc_{s}')(x)
    predictor = None
    if predictors:
      predictor = PrivateScoreNet(dtype=net.dtype, name=f'score_predictor_{s}')
    for i in range(depth):
      scores = None
      if predictor is not None and i == depth - 1:  # official: the last block of the stage only
        scores = token_scores(predictor(x))
        masks.append(scores)
      block = Block(net.embed_dims[s], net.num_heads[s], net.mlp_ratios[s], net.sr_ratios[s],
                    net.qkv_bias, net.drop_rate, net.attn_drop_rate, float(rates[cur + i]),
                    threshold, dtype=net.dtype, fusion=fusion,
                    fusion_options=fusion_options, stage=s, index=i, num_blocks=depth,
                    name=f'block_enc_{s}_{i}')
      x = block(x, scores, train=train)
    cur += depth
    norm = PrivateLayerNorm(LN_EPS, dtype=net.dtype, name=f'norm_enc_{s}')
    x = norm(x)
    site = registry.Site(f'norm_enc_{s}', s, depth - 1, depth, threshold, options,
                         scale=norm.variables['params']['scale'])
    x, _ = registry.apply_point(found, 'stage_end', x, site, {})
    skips.append(x)
  return skips, masks


def decoder_drop_path_rates(depths: Sequence[int], drop_path_rate: float) -> list:
  """Official: per decoder stage k (encoder width index len(depths) - 2 - k), block i gets
  dpr[cur_dec + i], dpr = linspace(0, rate, sum(depths)), cur_dec += that stage's depth."""
  dpr = np.linspace(0.0, drop_path_rate, sum(depths))
  rates, cur = [], 0
  for idx in reversed(range(len(depths) - 1)):
    rates.append([float(dpr[cur + i]) for i in range(depths[idx])])
    cur += depths[idx]
  return rates


class Architecture(nn.Module):
  """The fields gen_bX and dis_bX share (official model_cfg.py; b0's by default)."""
  embed_dims: Sequence[int] = TRANSLATION_ARCHS['b0']['embed_dims']
  num_heads: Sequence[int] = NUM_HEADS
  mlp_ratios: Sequence[float] = MLP_RATIOS
  depths: Sequence[int] = TRANSLATION_ARCHS['b0']['depths']
  sr_ratios: Sequence[int] = SR_RATIOS
  qkv_bias: bool = True
  drop_rate: float = 0.0
  attn_drop_rate: float = 0.0
  drop_path_rate: float = 0.1
  dtype: Any = jnp.float32


class MiTGenerator(Architecture):
  """The official MixVisionTransformerGen (TokenFusion translation generator).

  Input [M, N, S, S, C] (S divisible by 32). Returns
    'branches': float32 [M, N, S, S, 3] tanh images,
    'ensemble': float32 [N, S, S, 3] = sum_m softmax(alpha)_m * stop_gradient(branches[m]),
    'alpha': float32 [M] softmax(alpha),
    'masks': the token score maps [M, N, S/2^(s+1), S/2^(s+1)] of the 5 encoder stages (only
             their last blocks are scored); [] for a fusion without token scores.
  `deterministic=False` draws stochastic depth and dropout (rng 'dropout'); `train` is taken
  for pix2pix's interface and changes nothing (no batch statistics here).

  Module names (torch names: cen_jax/tokenfusion_io.py): patch_embed_enc_{s},
  score_predictor_{s}, block_enc_{s}_{i}, norm_enc_{s}, patch_embed_dec_{k}, block_dec_{k}_{i},
  norm_dec_{k}, project, alpha.
  """
  fusion: str = 'tokenfusion'  # a registered fusion that fits the MiT (registry.check_backbone)
  threshold: float = MASK_THRESHOLD
  fusion_options: tuple = ()  # (key, value) pairs: Site.options
  out_channels: int = 3

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, deterministic: bool) -> dict:
    del train  # no batch statistics: only `deterministic` changes the computation
    _check_input('MiTGenerator', x, self.depths)
    fusion = mit_lib.check_fusion(self.fusion, x.shape[0])
    drop = not deterministic
    skips, masks = _encode(self, x, self.fusion, fusion.token_scores, drop)
    x = skips[-1]
    last = len(self.depths) - 1
    for k, rates in enumerate(decoder_drop_path_rates(self.depths, self.drop_path_rate)):
      idx = last - 1 - k  # the encoder stage whose width and skip this decoder stage takes
      x = PatchUpsample(self.embed_dims[idx], dtype=self.dtype, name=f'patch_embed_dec_{k}')(x)
      x = x + skips[idx]
      for i, rate in enumerate(rates):
        x = Block(self.embed_dims[idx], self.num_heads[idx], self.mlp_ratios[idx],
                  self.sr_ratios[idx], self.qkv_bias, self.drop_rate, self.attn_drop_rate,
                  rate, self.threshold, dtype=self.dtype, fusion=NO_FUSION, stage=idx, index=i,
                  num_blocks=len(rates), name=f'block_dec_{k}_{i}')(x, None, train=drop)
      x = PrivateLayerNorm(LN_EPS, dtype=self.dtype, name=f'norm_dec_{k}')(x)
    x = PatchUpsample(self.embed_dims[0], dtype=self.dtype, name=f'patch_embed_dec_{last}')(x)
    x = Conv(self.out_channels, 1, 1, 0, dtype=self.dtype, name='project')(x)
    images = jnp.tanh(x.astype(jnp.float32))
    alpha = self.param('alpha', nn.initializers.ones, (images.shape[0],))
    ensemble, weights = fusion_ops.late_ensemble(images, alpha)
    return {'branches': images, 'ensemble': ensemble, 'alpha': weights, 'masks': masks}


class MiTDiscriminator(Architecture):
  """The official MixVisionTransformerDis: the generator's 5-stage encoder (no predictors, no
  fusion) on concat(x[m], y[m]) (input first), then the 1x1 conv `project` to one channel.

  Returns PRE-sigmoid logits float32 [M, N, S/32, S/32, 1]: sigmoid(logits) is the official
  output. `y` may be one image batch [N, S, S, C] for all branches (the official D(x, [y] * M)).
  `deterministic=False` draws stochastic depth (the official D trains in train mode).
  """

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, *, train: bool,
               deterministic: bool = True) -> jax.Array:
    del train  # no batch statistics
    if y.ndim == x.ndim - 1:
      y = jnp.broadcast_to(y, (x.shape[0],) + y.shape)
    if x.ndim != 5 or x.shape[:-1] != y.shape[:-1]:
      raise ValueError(f'MiTDiscriminator inputs {x.shape} and {y.shape}: expected '
                       f'[M, N, S, S, C] each, with equal M, N, S')
    _check_input('MiTDiscriminator', x, self.depths)
    out = jnp.concatenate([x.astype(self.dtype), y.astype(self.dtype)], axis=-1)
    features, _ = _encode(self, out, NO_FUSION, False, not deterministic)
    logits = Conv(1, 1, 1, 0, dtype=self.dtype, name='project')(features[-1])
    return logits.astype(jnp.float32)


def _arch(arch: str) -> dict:
  if arch not in TRANSLATION_ARCHS:
    raise ValueError(f'translation MiT arch={arch!r}: expected one of {sorted(TRANSLATION_ARCHS)}')
  return TRANSLATION_ARCHS[arch]


def mit_generator(arch: str, **fields) -> MiTGenerator:
  """The official gen_b0 .. gen_b5 ('b0'..'b5'; fields override, e.g. fusion, drop_path_rate)."""
  return MiTGenerator(**{**_arch(arch), **fields})


def mit_discriminator(arch: str, **fields) -> MiTDiscriminator:
  """The official dis_b0 .. dis_b5 ('b0'..'b5'; fields override)."""
  return MiTDiscriminator(**{**_arch(arch), **fields})
