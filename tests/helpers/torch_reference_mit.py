"""A PyTorch reference of the official TokenFusion RGB-D segmenter (WeTr: MiT encoder + SegFormer
head + alpha ensemble), for parity tests.

Written from reading yikaiw/TokenFusion semantic_segmentation/models/{mix_transformer,modules,
segformer}.py, without timm or mmcv (DropPath and ConvModule are written out here). Module
attribute names are the official ones, so `state_dict()` keys are the official keys (without
the DataParallel 'module.' prefix). Behaviour follows the official forward: one score predictor
per stage with one MLP per branch, run before every block; the attention output scaled by the
score and swapped where the score < 0.02; one decoder applied to each branch in turn (its
BatchNorm shared); ensemble = sum softmax(alpha)_l * logits_l.detach().
Options the official fixes are arguments only so tests can turn them off: `drop_path_rate`
(official 0.1), `dropout` (the head's Dropout2d, official 0.1) and `fusion` ('none': no
predictor, the official forward with mask=None).
"""

import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.torch_reference import ModuleParallel

MASK_THRESHOLD = 0.02
_WIDE = (64, 128, 320, 512)
MIT_ARCHS = {
    'mit_b0': ((32, 64, 160, 256), (2, 2, 2, 2)),
    'mit_b1': (_WIDE, (2, 2, 2, 2)),
    'mit_b2': (_WIDE, (3, 4, 6, 3)),
    'mit_b3': (_WIDE, (3, 4, 18, 3)),
    'mit_b4': (_WIDE, (3, 8, 27, 3)),
    'mit_b5': (_WIDE, (3, 6, 40, 3)),
}
NUM_HEADS, MLP_RATIOS, SR_RATIOS = (1, 2, 5, 8), (4, 4, 4, 4), (8, 4, 2, 1)


class LayerNormParallel(nn.Module):
  """A private LayerNorm (eps 1e-6) per branch: ln_0, ln_1, ..."""

  def __init__(self, dim, num_parallel):
    super().__init__()
    for i in range(num_parallel):
      setattr(self, f'ln_{i}', nn.LayerNorm(dim, eps=1e-6))

  def forward(self, xs):
    return [getattr(self, f'ln_{i}')(x) for i, x in enumerate(xs)]


def token_exchange(xs, masks, threshold):
  """Official TokenExchange (2 branches): a token of branch i whose score < threshold takes
  branch 1 - i's value (after both were scaled by their scores)."""
  x0, x1 = torch.zeros_like(xs[0]), torch.zeros_like(xs[1])
  keep0, keep1 = masks[0] >= threshold, masks[1] >= threshold
  x0[keep0], x0[~keep0] = xs[0][keep0], xs[1][~keep0]
  x1[keep1], x1[~keep1] = xs[1][keep1], xs[0][~keep1]
  return [x0, x1]


class DropPath(nn.Module):
  """timm DropPath: per sample, kept ones scaled by 1 / keep."""

  def __init__(self, rate):
    super().__init__()
    self.rate = rate

  def forward(self, x):
    if self.rate == 0 or not self.training:
      return x
    keep = 1 - self.rate
    draw = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x.div(keep) * draw


def to_tokens(x):
  return x.flatten(2).transpose(1, 2)


def to_map(x, h, w):
  return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


class DWConv(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

  def forward(self, x, h, w):
    return to_tokens(self.dwconv(to_map(x, h, w)))


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = ModuleParallel(nn.Linear(dim, hidden))
    self.dwconv = DWConv(hidden)
    self.act = ModuleParallel(nn.GELU())
    self.fc2 = ModuleParallel(nn.Linear(hidden, dim))

  def forward(self, xs, h, w):
    xs = self.act([self.dwconv(x, h, w) for x in self.fc1(xs)])
    return self.fc2(xs)


class Attention(nn.Module):
  norm_class = LayerNormParallel  # the translation reference's has other attribute names

  def __init__(self, dim, num_heads, sr_ratio, num_parallel):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.q = ModuleParallel(nn.Linear(dim, dim, bias=True))
    self.kv = ModuleParallel(nn.Linear(dim, dim * 2, bias=True))
    self.proj = ModuleParallel(nn.Linear(dim, dim))
    self.sr_ratio = sr_ratio
    if sr_ratio > 1:
      self.sr = ModuleParallel(nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio))
      self.norm = self.norm_class(dim, num_parallel)

  def forward(self, xs, h, w, masks):
    b, n, c = xs[0].shape
    heads, d = self.num_heads, c // self.num_heads
    qs = [q.reshape(b, n, heads, d).permute(0, 2, 1, 3) for q in self.q(xs)]
    if self.sr_ratio > 1:
      xs = self.norm([to_tokens(x) for x in self.sr([to_map(x, h, w) for x in xs])])
    kvs = [kv.reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4) for kv in self.kv(xs)]
    outs = []
    for q, kv in zip(qs, kvs):
      attn = ((q @ kv[0].transpose(-2, -1)) * self.scale).softmax(dim=-1)
      outs.append((attn @ kv[1]).transpose(1, 2).reshape(b, n, c))
    outs = self.proj(outs)
    if masks is not None:
      outs = [o * m.unsqueeze(2) for o, m in zip(outs, masks)]
      outs = token_exchange(outs, masks, MASK_THRESHOLD)
    return outs


class PredictorLG(nn.Module):
  """Per-branch token scorers (nn.ModuleList score_nets, one nn.Sequential per branch)."""

  def __init__(self, dim, num_parallel):
    super().__init__()
    self.score_nets = nn.ModuleList([nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim // 2), nn.GELU(),
        nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))
        for _ in range(num_parallel)])

  def forward(self, xs):
    return [net(x) for net, x in zip(self.score_nets, xs)]


class Block(nn.Module):

  def __init__(self, dim, num_heads, mlp_ratio, sr_ratio, drop_path, num_parallel):
    super().__init__()
    self.norm1 = LayerNormParallel(dim, num_parallel)
    self.attn = Attention(dim, num_heads, sr_ratio, num_parallel)
    self.drop_path = ModuleParallel(DropPath(drop_path))
    self.norm2 = LayerNormParallel(dim, num_parallel)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, xs, h, w, masks):
    f = self.drop_path(self.attn(self.norm1(xs), h, w, masks))
    xs = [x + y for x, y in zip(xs, f)]
    f = self.drop_path(self.mlp(self.norm2(xs), h, w))
    return [x + y for x, y in zip(xs, f)]


class OverlapPatchEmbed(nn.Module):

  def __init__(self, patch_size, stride, cin, dim, num_parallel):
    super().__init__()
    self.proj = ModuleParallel(nn.Conv2d(cin, dim, patch_size, stride=stride,
                                         padding=patch_size // 2))
    self.norm = LayerNormParallel(dim, num_parallel)

  def forward(self, xs):
    xs = self.proj(xs)
    h, w = xs[0].shape[2:]
    return self.norm([to_tokens(x) for x in xs]), h, w


class MixVisionTransformer(nn.Module):

  def __init__(self, embed_dims, depths, num_parallel=2, drop_path_rate=0.1,
               fusion='tokenfusion'):
    super().__init__()
    self.embed_dims, self.depths, self.fusion = list(embed_dims), depths, fusion
    for s in range(4):
      setattr(self, f'patch_embed{s + 1}', OverlapPatchEmbed(
          7 if s == 0 else 3, 4 if s == 0 else 2, 3 if s == 0 else embed_dims[s - 1],
          embed_dims[s], num_parallel))
    if fusion == 'tokenfusion':
      self.score_predictor = nn.ModuleList([PredictorLG(d, num_parallel) for d in embed_dims])
    rates = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
    cur = 0
    for s in range(4):
      setattr(self, f'block{s + 1}', nn.ModuleList([Block(
          embed_dims[s], NUM_HEADS[s], MLP_RATIOS[s], SR_RATIOS[s], rates[cur + i],
          num_parallel) for i in range(depths[s])]))
      setattr(self, f'norm{s + 1}', LayerNormParallel(embed_dims[s], num_parallel))
      cur += depths[s]

  def forward(self, xs):
    b = xs[0].shape[0]
    outs = [[] for _ in xs]
    masks = []
    for s in range(4):
      xs, h, w = getattr(self, f'patch_embed{s + 1}')(xs)
      for blk in getattr(self, f'block{s + 1}'):
        mask = None
        if self.fusion == 'tokenfusion':
          scores = self.score_predictor[s](xs)
          mask = [F.softmax(sc.reshape(b, -1, 2), dim=2)[:, :, 0] for sc in scores]
          masks.append(mask)
        xs = blk(xs, h, w, mask)
      xs = getattr(self, f'norm{s + 1}')(xs)
      xs = [x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous() for x in xs]
      for out, x in zip(outs, xs):
        out.append(x)
    return outs, masks


class MLP(nn.Module):

  def __init__(self, cin, dim):
    super().__init__()
    self.proj = nn.Linear(cin, dim)

  def forward(self, x):
    return self.proj(to_tokens(x))


class ConvModule(nn.Module):
  """mmcv ConvModule(k=1, norm_cfg BN): conv (no bias), bn, ReLU."""

  def __init__(self, cin, cout):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, 1, bias=False)
    self.bn = nn.BatchNorm2d(cout)
    self.activate = nn.ReLU(inplace=True)

  def forward(self, x):
    return self.activate(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):

  def __init__(self, in_channels, embedding_dim, num_classes, dropout=0.1):
    super().__init__()
    for s in (4, 3, 2, 1):
      setattr(self, f'linear_c{s}', MLP(in_channels[s - 1], embedding_dim))
    self.dropout = nn.Dropout2d(dropout)
    self.linear_fuse = ConvModule(embedding_dim * 4, embedding_dim)
    self.linear_pred = nn.Conv2d(embedding_dim, num_classes, 1)

  def forward(self, feats):
    size = feats[0].shape[2:]
    parts = []
    for s in (4, 3, 2, 1):
      c = feats[s - 1]
      y = getattr(self, f'linear_c{s}')(c).permute(0, 2, 1).reshape(c.shape[0], -1, *c.shape[2:])
      parts.append(F.interpolate(y, size=size, mode='bilinear', align_corners=False)
                   if s > 1 else y)
    return self.linear_pred(self.dropout(self.linear_fuse(torch.cat(parts, dim=1))))


class WeTr(nn.Module):

  def __init__(self, backbone, num_classes=40, embedding_dim=256, num_parallel=2,
               drop_path_rate=0.1, dropout=0.1, fusion='tokenfusion'):
    super().__init__()
    dims, depths = MIT_ARCHS[backbone]
    self.encoder = MixVisionTransformer(dims, depths, num_parallel, drop_path_rate, fusion)
    self.decoder = SegFormerHead(dims, embedding_dim, num_classes, dropout)
    self.alpha = nn.Parameter(torch.ones(num_parallel))

  def forward(self, xs):
    feats, masks = self.encoder(xs)
    outs = [self.decoder(f) for f in feats]
    weights = F.softmax(self.alpha, dim=0)
    ens = 0
    for l, out in enumerate(outs):
      ens = ens + weights[l] * out.detach()
    return outs + [ens], masks


def count_params(module) -> int:
  """The official utils/meter.py compute_params: parameters only, no buffers."""
  return sum(p.numel() for p in module.parameters())
