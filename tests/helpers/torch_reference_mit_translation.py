"""A PyTorch reference of the official TokenFusion translation networks (MixVisionTransformerGen,
MixVisionTransformerDis), for parity tests.

Written from reading yikaiw/TokenFusion image2image_translation/models/{model_pruning,modules,
model_cfg}.py, without timm, mmcv or the global `cfg` (the number of branches is an argument).
Module attribute names are the official ones, so `state_dict()` keys are the official keys
(without the DataParallel 'module.' prefix): LayerNormParallel holds lrnorm_{i}, the depth-wise
conv is DWConv.dwconv = ModuleParallel(Conv2d) (key mlp.dwconv.dwconv.module.weight).
Behaviour follows the official forward: the generator scores only the last block of each
encoder stage (the others run with mask=None); PatchUpsample creates a `norm` it never applies;
the decoder's drop-path rates are dpr[cur_dec + i] with cur_dec counted from 0 (as the
official); the discriminator ends with a sigmoid.
Options the official fixes are arguments only so tests can turn them off: `drop_path_rate`
(official 0.1) and `fusion` ('tokenfusion' official; 'none': no predictor, every block with
mask=None; 'cen': no predictor, CEN's channel exchange after every encoder block's norm2,
reading that norm's scales, with `cen_threshold` -- not an official translation model, the
reference for cen-jax's registry fusion 'cen' at the MiT point 'norm2').
"""

import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import torch_reference_mit as mit_reference
from tests.helpers.torch_reference import ModuleParallel
from tests.helpers.torch_reference_mit import (DropPath, PredictorLG, count_params,  # noqa: F401
                                               to_map, to_tokens)

MASK_THRESHOLD = 0.02
NUM_HEADS, MLP_RATIOS, SR_RATIOS = (1, 2, 4, 8, 16), (4, 4, 4, 4, 4), (16, 8, 4, 2, 1)
_WIDE = (64, 128, 256, 512, 1024)
ARCHS = {  # model_cfg.gen_bX / dis_bX: (embed_dims, depths)
    'b0': ((32, 64, 128, 256, 512), (2, 2, 2, 2, 2)),
    'b1': (_WIDE, (2, 2, 2, 2, 2)),
    'b2': (_WIDE, (3, 4, 4, 6, 3)),
    'b3': (_WIDE, (3, 4, 4, 18, 3)),
    'b4': (_WIDE, (3, 8, 8, 27, 3)),
    'b5': (_WIDE, (3, 6, 6, 40, 3)),
}


class LayerNormParallel(nn.Module):
  """The translation code's private LayerNorms (eps 1e-6): lrnorm_0, lrnorm_1, ..."""

  def __init__(self, dim, num_parallel):
    super().__init__()
    self.num_parallel = num_parallel
    for i in range(num_parallel):
      setattr(self, f'lrnorm_{i}', nn.LayerNorm(dim, eps=1e-6))

  def forward(self, xs):
    return [getattr(self, f'lrnorm_{i}')(x) for i, x in enumerate(xs)]


def channel_exchange(xs, norms, threshold):
  """Official modules.ChannelExchange on tokens [B, N, C] (2 branches): channel c of branch i
  takes branch 1 - i's where |lrnorm_i.weight[c]| < threshold."""
  keep0 = norms.lrnorm_0.weight.abs() >= threshold
  keep1 = norms.lrnorm_1.weight.abs() >= threshold
  return [torch.where(keep0, xs[0], xs[1]), torch.where(keep1, xs[1], xs[0])]


class DWConv(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.dwconv = ModuleParallel(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

  def forward(self, xs, h, w):
    return [to_tokens(x) for x in self.dwconv([to_map(x, h, w) for x in xs])]


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = ModuleParallel(nn.Linear(dim, hidden))
    self.dwconv = DWConv(hidden)
    self.act = ModuleParallel(nn.GELU())
    self.fc2 = ModuleParallel(nn.Linear(hidden, dim))

  def forward(self, xs, h, w):
    return self.fc2(self.act(self.dwconv(self.fc1(xs), h, w)))


class Attention(mit_reference.Attention):
  """The segmentation reference's attention (the same official code), with this file's
  LayerNormParallel (lrnorm_{i}) for its spatial-reduction norm."""
  norm_class = LayerNormParallel


class Block(nn.Module):

  def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, drop_path, num_parallel,
               cen_threshold=None):
    super().__init__()
    self.norm1 = LayerNormParallel(dim, num_parallel)
    self.attn = Attention(dim, num_heads, sr_ratio, num_parallel)
    self.drop_path = ModuleParallel(DropPath(drop_path))
    self.norm2 = LayerNormParallel(dim, num_parallel)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.cen_threshold = cen_threshold

  def forward(self, xs, h, w, masks=None):
    f = self.drop_path(self.attn(self.norm1(xs), h, w, masks))
    xs = [x + y for x, y in zip(xs, f)]
    y = self.norm2(xs)
    if self.cen_threshold is not None:
      y = channel_exchange(y, self.norm2, self.cen_threshold)
    f = self.drop_path(self.mlp(y, h, w))
    return [x + y for x, y in zip(xs, f)]


class OverlapPatchEmbed(nn.Module):
  """Official (translation): kernel 3, stride 2, padding 1."""

  def __init__(self, cin, dim, num_parallel):
    super().__init__()
    self.proj = ModuleParallel(nn.Conv2d(cin, dim, 3, stride=2, padding=1))
    self.norm = LayerNormParallel(dim, num_parallel)

  def forward(self, xs):
    xs = self.proj(xs)
    h, w = xs[0].shape[2:]
    return self.norm([to_tokens(x) for x in xs]), h, w


class PatchUpsample(nn.Module):
  """PixelShuffle(2), 1x1 conv; `norm` is created and never applied (official)."""

  def __init__(self, cin, dim, num_parallel):
    super().__init__()
    self.proj = ModuleParallel(nn.Conv2d(cin // 4, dim, 1))
    self.norm = LayerNormParallel(dim, num_parallel)
    self.pixelshuffle = ModuleParallel(nn.PixelShuffle(2))

  def forward(self, xs):
    xs = self.proj(self.pixelshuffle(xs))
    h, w = xs[0].shape[2:]
    return [to_tokens(x) for x in xs], h, w


def _patch_embeds(module, embed_dims, num_parallel):
  module.patch_embed_enc = nn.ModuleList([
      OverlapPatchEmbed(module.in_chans if i == 0 else embed_dims[i - 1], embed_dims[i],
                        num_parallel) for i in range(5)])


def _encoder_blocks(module, embed_dims, depths, num_parallel, drop_path_rate, cen_threshold):
  dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
  cur = 0
  module.block_enc, module.norm_enc = nn.ModuleList(), nn.ModuleList()
  for idx in range(5):
    module.block_enc.append(nn.ModuleList([
        Block(embed_dims[idx], NUM_HEADS[idx], MLP_RATIOS[idx], SR_RATIOS[idx], dpr[cur + i],
              num_parallel, cen_threshold) for i in range(depths[idx])]))
    module.norm_enc.append(LayerNormParallel(embed_dims[idx], num_parallel))
    cur += depths[idx]
  return dpr


def _to_maps(xs, b, h, w):
  return [x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for x in xs]


class MixVisionTransformerGen(nn.Module):

  def __init__(self, embed_dims, depths, num_parallel=2, drop_path_rate=0.1,
               fusion='tokenfusion', cen_threshold=2e-2):
    super().__init__()
    self.in_chans, self.fusion, self.num_parallel = 3, fusion, num_parallel
    cen = cen_threshold if fusion == 'cen' else None
    _patch_embeds(self, embed_dims, num_parallel)
    if fusion == 'tokenfusion':  # created where the official does: state_dict() in its order
      self.score_predictor = nn.ModuleList([PredictorLG(d, num_parallel) for d in embed_dims])
    dpr = _encoder_blocks(self, embed_dims, depths, num_parallel, drop_path_rate, cen)
    self.patch_embed_dec = nn.ModuleList([
        PatchUpsample(embed_dims[i], embed_dims[max(0, i - 1)], num_parallel)
        for i in range(5)[::-1]])
    cur = 0  # official: the decoder's dpr index restarts at 0
    self.block_dec, self.norm_dec = nn.ModuleList(), nn.ModuleList()
    for idx in (3, 2, 1, 0):
      self.block_dec.append(nn.ModuleList([
          Block(embed_dims[idx], NUM_HEADS[idx], MLP_RATIOS[idx], SR_RATIOS[idx], dpr[cur + i],
                num_parallel) for i in range(depths[idx])]))
      self.norm_dec.append(LayerNormParallel(embed_dims[idx], num_parallel))
      cur += depths[idx]
    self.project = ModuleParallel(nn.Conv2d(embed_dims[0], 3, 1, 1, 0))
    self.alpha = nn.Parameter(torch.ones(num_parallel))

  def forward(self, xs):
    b = xs[0].shape[0]
    outs, masks = [], []
    for i in range(5):
      xs, h, w = self.patch_embed_enc[i](xs)
      for j, blk in enumerate(self.block_enc[i]):
        mask = None
        if self.fusion == 'tokenfusion' and j == len(self.block_enc[i]) - 1:
          scores = self.score_predictor[i](xs)
          mask = [F.softmax(sc.reshape(b, -1, 2), dim=2)[:, :, 0] for sc in scores]
          masks.append(mask)
        xs = blk(xs, h, w, mask)
      xs = self.norm_enc[i](xs)
      outs.append(xs)
      xs = _to_maps(xs, b, h, w)
    for i in range(4):
      xs, h, w = self.patch_embed_dec[i](xs)
      xs = [x + o for x, o in zip(xs, outs[::-1][i + 1])]
      for blk in self.block_dec[i]:
        xs = blk(xs, h, w)
      xs = _to_maps(self.norm_dec[i](xs), b, h, w)
    xs, h, w = self.patch_embed_dec[4](xs)
    xs = [torch.tanh(x) for x in self.project(_to_maps(xs, b, h, w))]
    weights = F.softmax(self.alpha, dim=0)
    ens = 0
    for l in range(self.num_parallel):
      ens = ens + weights[l] * xs[l].detach()
    return xs + [ens], weights, masks


class MixVisionTransformerDis(nn.Module):

  def __init__(self, embed_dims, depths, num_parallel=2, drop_path_rate=0.1):
    super().__init__()
    self.in_chans = 6
    _patch_embeds(self, embed_dims, num_parallel)
    _encoder_blocks(self, embed_dims, depths, num_parallel, drop_path_rate, None)
    self.project = ModuleParallel(nn.Conv2d(embed_dims[4], 1, 1, 1, 0))

  def forward(self, xs, labels):
    xs = [torch.cat([x, y], 1) for x, y in zip(xs, labels)]
    b = xs[0].shape[0]
    for i in range(5):
      xs, h, w = self.patch_embed_enc[i](xs)
      for blk in self.block_enc[i]:
        xs = blk(xs, h, w)
      xs = _to_maps(self.norm_enc[i](xs), b, h, w)
    return [torch.sigmoid(x) for x in self.project(xs)]


def gen(arch, **kwargs):
  embed_dims, depths = ARCHS[arch]
  return MixVisionTransformerGen(embed_dims, depths, **kwargs)


def dis(arch, **kwargs):
  embed_dims, depths = ARCHS[arch]
  return MixVisionTransformerDis(embed_dims, depths, **kwargs)
