"""A PyTorch reference of the official CEN / AsymFusion RefineNet-LW segmenter, for parity tests.

Written from reading yikaiw/CEN semantic_segmentation/models/{model,modules}.py and
yikaiw/AsymFusion models/{model,parallel}.py. Module attribute names are the official ones, so
`state_dict()` keys are the official keys (without the DataParallel 'module.' prefix). Behaviour
follows the official forward, including its in-place ReLUs (in an RCU the skip becomes relu(x)).
Widths are parameters only so tests can build tiny models; the defaults are the official ones.
"""

import torch
import torch.nn.functional as F
from torch import nn

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class ModuleParallel(nn.Module):
  """One module shared by every branch (attribute 'module', as the official key names)."""

  def __init__(self, module):
    super().__init__()
    self.module = module

  def forward(self, xs):
    return [self.module(x) for x in xs]


class BatchNorm2dParallel(nn.Module):
  """A private BatchNorm2d per branch: bn_0, bn_1, ..."""

  def __init__(self, num_features, num_parallel):
    super().__init__()
    for i in range(num_parallel):
      setattr(self, f'bn_{i}', nn.BatchNorm2d(num_features))
    self.num_parallel = num_parallel

  def forward(self, xs):
    return [getattr(self, f'bn_{i}')(x) for i, x in enumerate(xs)]


def conv3x3(cin, cout, stride=1, bias=False):
  return ModuleParallel(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias))


def conv1x1(cin, cout, stride=1):
  return ModuleParallel(nn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=False))


def exchange(xs, bns, threshold):
  """CEN exchange: official swap for 2 branches; mean of the others (paper Eq. 6) beyond."""
  out = []
  for m, (x, bn) in enumerate(zip(xs, bns)):
    others = [xs[k] for k in range(len(xs)) if k != m]
    other = others[0] if len(others) == 1 else sum(others) / len(others)
    keep = bn.weight.abs() >= threshold
    y = torch.zeros_like(x)
    y[:, keep] = x[:, keep]
    y[:, ~keep] = other[:, ~keep]
    out.append(y)
  return out


def shift_shuffle(xs, reverse=False):
  """AsymFusion ShiftShuffle on 2 branches -> (shuffled, shifted); identity otherwise."""
  if len(xs) != 2:
    return xs, [0, 0]
  pos = [[-1, 0], [0, -1], [0, 1], [1, 0]]
  pos = pos[::-1] if reverse else pos
  group = xs[0].shape[1] // 5
  split = group * 4
  a0, b1 = xs[0][:, :split], xs[1][:, split:]
  a1, b0 = xs[1][:, :split], xs[0][:, split:]
  shuffled = [torch.cat([a0, b1], 1), torch.cat([a1, b0], 1)]
  h, w = a0.shape[-2:]
  shifts = []
  for a, b in ((a0, b1), (a1, b0)):
    parts = []
    for idx, start in enumerate(range(0, split, group)):
      ph, pw = pos[idx][0] + 1, pos[idx][1] + 1
      parts.append(F.pad(a[:, start:start + group], (1, 1, 1, 1))[:, :, ph:h + ph, pw:w + pw])
    parts.append(torch.zeros_like(b))
    shifts.append(torch.cat(parts, 1))
  return shuffled, shifts


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, num_parallel, fusion, threshold, stride=1,
               downsample=None, use_shuffle=False):
    super().__init__()
    self.conv1 = conv1x1(inplanes, planes)
    self.bn1 = BatchNorm2dParallel(planes, num_parallel)
    self.conv2 = conv3x3(planes, planes, stride=stride)
    self.bn2 = BatchNorm2dParallel(planes, num_parallel)
    self.conv3 = conv1x1(planes, planes * 4)
    self.bn3 = BatchNorm2dParallel(planes * 4, num_parallel)
    self.relu = ModuleParallel(nn.ReLU(inplace=True))
    self.downsample = downsample
    self.num_parallel = num_parallel
    self.fusion = fusion
    self.threshold = threshold
    self.use_shuffle = use_shuffle

  def forward(self, x):
    residual = x
    out = self.relu(self.bn1(self.conv1(x)))
    shuffle = self.use_shuffle and len(x) > 1
    if shuffle:
      out, shift = shift_shuffle(out)
    out = self.bn2(self.conv2(out))
    if self.fusion == 'cen' and len(x) > 1:
      bns = [getattr(self.bn2, f'bn_{i}') for i in range(self.num_parallel)]
      out = exchange(out, bns, self.threshold)
    out = self.relu(out)
    if shuffle:
      out[0] = out[0] + shift[1]
      out[1] = out[1] + shift[0]
      out, _ = shift_shuffle(out, reverse=True)
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      residual = self.downsample(x)
    out = [out[i] + residual[i] for i in range(self.num_parallel)]
    return self.relu(out)


class CRPBlock(nn.Module):

  def __init__(self, cin, cout, num_stages, num_parallel):
    super().__init__()
    for i in range(num_stages):
      setattr(self, f'{i + 1}_outvar_dimred', conv3x3(cin if i == 0 else cout, cout))
    self.num_stages = num_stages
    self.num_parallel = num_parallel
    self.maxpool = ModuleParallel(nn.MaxPool2d(kernel_size=5, stride=1, padding=2))

  def forward(self, x):
    top = x
    for i in range(self.num_stages):
      top = getattr(self, f'{i + 1}_outvar_dimred')(self.maxpool(top))
      x = [x[l] + top[l] for l in range(self.num_parallel)]
    return x


class RCUBlock(nn.Module):
  SUFFIXES = ('_conv', '_conv_relu_varout_dimred')

  def __init__(self, cin, cout, num_blocks, num_stages, num_parallel):
    super().__init__()
    for i in range(num_blocks):
      for j in range(num_stages):
        setattr(self, f'{i + 1}{self.SUFFIXES[j]}',
                conv3x3(cin if (i == 0 and j == 0) else cout, cout, bias=(j == 0)))
    self.num_blocks = num_blocks
    self.num_stages = num_stages
    self.num_parallel = num_parallel
    self.relu = ModuleParallel(nn.ReLU(inplace=True))

  def forward(self, x):
    for i in range(self.num_blocks):
      residual = x  # the in-place ReLU below also rewrites these tensors (official behaviour)
      for j in range(self.num_stages):
        x = self.relu(x)
        x = getattr(self, f'{i + 1}{self.SUFFIXES[j]}')(x)
      x = [x[l] + residual[l] for l in range(self.num_parallel)]
    return x


class RefineNet(nn.Module):

  def __init__(self, blocks, num_parallel, num_classes, fusion='cen', threshold=2e-2,
               stem_width=64, widths=(64, 128, 256, 512), decoder_widths=(512, 256)):
    super().__init__()
    self.inplanes = stem_width
    self.num_parallel = num_parallel
    self.fusion = fusion
    self.threshold = threshold
    self.dropout = ModuleParallel(nn.Dropout(p=0.5))
    self.conv1 = ModuleParallel(nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False))
    self.bn1 = BatchNorm2dParallel(stem_width, num_parallel)
    self.relu = ModuleParallel(nn.ReLU(inplace=True))
    self.maxpool = ModuleParallel(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    self.layer1 = self._make_layer(widths[0], blocks[0])
    self.layer2 = self._make_layer(widths[1], blocks[1], stride=2)
    self.layer3 = self._make_layer(widths[2], blocks[2], stride=2)
    self.layer4 = self._make_layer(widths[3], blocks[3], stride=2)
    wide, narrow = decoder_widths
    c1, c2, c3, c4 = [w * 4 for w in widths]
    self.p_ims1d2_outl1_dimred = conv3x3(c4, wide)
    self.adapt_stage1_b = self._make_rcu(wide, wide, 2, 2)
    self.mflow_conv_g1_pool = self._make_crp(wide, wide, 4)
    self.mflow_conv_g1_b = self._make_rcu(wide, wide, 3, 2)
    self.mflow_conv_g1_b3_joint_varout_dimred = conv3x3(wide, narrow)
    for level, cin in zip((2, 3, 4), (c3, c2, c1)):
      setattr(self, f'p_ims1d2_outl{level}_dimred', conv3x3(cin, narrow))
      setattr(self, f'adapt_stage{level}_b', self._make_rcu(narrow, narrow, 2, 2))
      setattr(self, f'adapt_stage{level}_b2_joint_varout_dimred', conv3x3(narrow, narrow))
      setattr(self, f'mflow_conv_g{level}_pool', self._make_crp(narrow, narrow, 4))
      setattr(self, f'mflow_conv_g{level}_b', self._make_rcu(narrow, narrow, 3, 2))
      if level < 4:
        setattr(self, f'mflow_conv_g{level}_b3_joint_varout_dimred', conv3x3(narrow, narrow))
    self.clf_conv = conv3x3(narrow, num_classes, bias=True)
    self.alpha = nn.Parameter(torch.ones(num_parallel))

  def _make_crp(self, cin, cout, num_stages):
    return nn.Sequential(CRPBlock(cin, cout, num_stages, self.num_parallel))

  def _make_rcu(self, cin, cout, num_blocks, num_stages):
    return nn.Sequential(RCUBlock(cin, cout, num_blocks, num_stages, self.num_parallel))

  def _make_layer(self, planes, num_blocks, stride=1):
    downsample = None
    if stride != 1 or self.inplanes != planes * 4:
      downsample = nn.Sequential(conv1x1(self.inplanes, planes * 4, stride=stride),
                                 BatchNorm2dParallel(planes * 4, self.num_parallel))
    args = (self.num_parallel, self.fusion, self.threshold)
    layers = [Bottleneck(self.inplanes, planes, *args, stride, downsample)]
    self.inplanes = planes * 4
    for i in range(1, num_blocks):
      # AsymFusion: the official `use_shuffle = i >= num_blocks - 1` (last block, never block 0).
      use_shuffle = self.fusion == 'asymfusion' and i >= num_blocks - 1
      layers.append(Bottleneck(self.inplanes, planes, *args, use_shuffle=use_shuffle))
    return nn.Sequential(*layers)

  def _level(self, level, skip, coarser):
    """Decoder levels 2..4: adapted skip + upsampled coarser path, relu, CRP, RCU."""
    y = getattr(self, f'p_ims1d2_outl{level}_dimred')(skip)
    y = getattr(self, f'adapt_stage{level}_b')(y)
    y = getattr(self, f'adapt_stage{level}_b2_joint_varout_dimred')(y)
    y = self.relu([y[l] + coarser[l] for l in range(self.num_parallel)])
    y = getattr(self, f'mflow_conv_g{level}_pool')(y)
    return getattr(self, f'mflow_conv_g{level}_b')(y)

  @staticmethod
  def _upsample(xs, like):
    return [F.interpolate(x, size=like[0].shape[2:], mode='bilinear', align_corners=True)
            for x in xs]

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    l1 = self.layer1(x)
    l2 = self.layer2(l1)
    l3 = self.layer3(l2)
    l4 = self.layer4(l3)
    l4 = self.dropout(l4)
    l3 = self.dropout(l3)
    x4 = self.relu(self.adapt_stage1_b(self.p_ims1d2_outl1_dimred(l4)))
    x4 = self.mflow_conv_g1_b(self.mflow_conv_g1_pool(x4))
    x4 = self._upsample(self.mflow_conv_g1_b3_joint_varout_dimred(x4), l3)
    x3 = self._level(2, l3, x4)
    x3 = self._upsample(self.mflow_conv_g2_b3_joint_varout_dimred(x3), l2)
    x2 = self._level(3, l2, x3)
    x2 = self._upsample(self.mflow_conv_g3_b3_joint_varout_dimred(x2), l1)
    x1 = self.dropout(self._level(4, l1, x2))
    out = self.clf_conv(x1)
    alpha_soft = F.softmax(self.alpha, dim=0)
    ens = 0
    for l in range(self.num_parallel):
      ens = ens + alpha_soft[l] * out[l].detach()
    return out + [ens], alpha_soft


def randomize_(model, threshold, seed=0, exchanged_fraction=0.3):
  """Random BN affine parameters and statistics (so BN is not the identity), bn2 scales below
  `threshold` for a fraction of channels (so exchanges happen), a random alpha."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, module in model.named_modules():
      if not isinstance(module, nn.BatchNorm2d):
        continue
      c = module.num_features
      module.weight.copy_(0.5 + torch.rand(c, generator=gen))
      module.bias.copy_(0.1 * torch.randn(c, generator=gen))
      module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
      module.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
      if '.bn2.' in name:
        small = torch.rand(c, generator=gen) < exchanged_fraction
        tiny = (torch.rand(c, generator=gen) - 0.5) * threshold  # |w| < threshold / 2
        module.weight.copy_(torch.where(small, tiny, module.weight))
    model.alpha.copy_(torch.randn(model.num_parallel, generator=gen))
  return model
