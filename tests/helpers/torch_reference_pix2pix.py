"""A PyTorch reference of the official CEN image-to-image translation networks, for parity tests.

Written from reading yikaiw/CEN image2image_translation/models/{model,modules}.py. Attribute
names are the official ones, so `state_dict()` keys are the official checkpoint keys
(checkpoint-gen.pkl / checkpoint-dis.pkl). The forward follows the official one, including its
in-place activations: `nn.LeakyReLU(0.2, True)` at the start of a ConvBlock rewrites the
stored encoder output it reads, so the U-Net skips carry leaky_relu(enc_k). Exchange: the
official swap for 2 branches, the mean of the other branches (paper Eq. 6) beyond. Widths,
depth (num_downs) and the dropout rate are parameters so tests can build small models; the
defaults are the official ones.
"""

import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers.torch_reference import ModuleParallel, exchange


class InstanceNorm2dParallel(nn.Module):
  """A private affine InstanceNorm2d (tracked running statistics) per branch: insnorm_0, ..."""

  def __init__(self, num_features, num_parallel):
    super().__init__()
    for i in range(num_parallel):
      setattr(self, f'insnorm_{i}',
              nn.InstanceNorm2d(num_features, affine=True, track_running_stats=True))

  def forward(self, xs):
    return [getattr(self, f'insnorm_{i}')(x) for i, x in enumerate(xs)]


class ConvBlock(nn.Module):

  def __init__(self, cin, cout, num_parallel, exchange_on, threshold, activation=True,
               instance_norm=True):
    super().__init__()
    self.conv = ModuleParallel(nn.Conv2d(cin, cout, 4, 2, 1))
    self.activation = activation
    self.lrelu = ModuleParallel(nn.LeakyReLU(0.2, True))
    self.instance_norm = instance_norm
    self.insnorm_conv = InstanceNorm2dParallel(cout, num_parallel)
    self.exchange_on = exchange_on
    self.threshold = threshold
    self.num_parallel = num_parallel

  def forward(self, x):
    out = self.conv(self.lrelu(x)) if self.activation else self.conv(x)
    if self.instance_norm:
      out = self.insnorm_conv(out)
      if self.exchange_on and len(x) > 1:
        norms = [getattr(self.insnorm_conv, f'insnorm_{i}') for i in range(self.num_parallel)]
        out = exchange(out, norms, self.threshold)
    return out


class ConvBlockShare(nn.Module):

  def __init__(self, cin, cout, stride=2, activation=True, instance_norm=True):
    super().__init__()
    self.conv = ModuleParallel(nn.Conv2d(cin, cout, 4, stride, 1))
    self.activation = activation
    self.lrelu = ModuleParallel(nn.LeakyReLU(0.2, True))
    self.instance_norm = instance_norm
    self.insnorm = ModuleParallel(nn.InstanceNorm2d(cout, affine=True, track_running_stats=True))

  def forward(self, x):
    out = self.conv(self.lrelu(x)) if self.activation else self.conv(x)
    if self.instance_norm:
      out = self.insnorm(out)
    return out


class DeconvBlock(nn.Module):

  def __init__(self, cin, cout, num_parallel, instance_norm=True, dropout=False, drop_rate=0.5):
    super().__init__()
    self.deconv = ModuleParallel(nn.ConvTranspose2d(cin, cout, 4, 2, 1))
    self.insnorm_deconv = InstanceNorm2dParallel(cout, num_parallel)
    self.drop = ModuleParallel(nn.Dropout(drop_rate))
    self.relu = ModuleParallel(nn.ReLU(True))
    self.instance_norm = instance_norm
    self.dropout = dropout

  def forward(self, x):
    out = self.deconv(self.relu(x))
    if self.instance_norm:
      out = self.insnorm_deconv(out)
    if self.dropout:
      out = self.drop(out)
    return out


class Generator(nn.Module):
  """Official U-Net; `num_downs` = 8 at 256x256. forward -> (branches + [ensemble], alpha_soft)."""

  def __init__(self, num_parallel, input_dim=3, num_filter=64, output_dim=3, num_downs=8,
               exchange_on=True, threshold=1e-2, drop_rate=0.5):
    super().__init__()
    widths = [num_filter * min(2 ** k, 8) for k in range(num_downs)]
    self.num_downs = num_downs
    self.num_parallel = num_parallel
    for k in range(1, num_downs + 1):
      cin = input_dim if k == 1 else widths[k - 2]
      setattr(self, f'conv{k}', ConvBlock(cin, widths[k - 1], num_parallel, exchange_on,
                                          threshold, activation=k > 1,
                                          instance_norm=1 < k < num_downs))
    for k in range(1, num_downs + 1):
      cin = widths[-1] if k == 1 else 2 * widths[num_downs - k]
      last = k == num_downs
      cout = output_dim if last else widths[num_downs - k - 1]
      setattr(self, f'deconv{k}', DeconvBlock(cin, cout, num_parallel, instance_norm=not last,
                                              dropout=k <= 3 and not last,
                                              drop_rate=drop_rate))
    self.tanh = ModuleParallel(nn.Tanh())
    self.alpha = nn.Parameter(torch.ones(num_parallel))

  def forward(self, x):
    enc = []
    out = x
    for k in range(1, self.num_downs + 1):
      out = getattr(self, f'conv{k}')(out)
      enc.append(out)  # the same tensors: the next block's in-place LeakyReLU rewrites them
    for k in range(1, self.num_downs + 1):
      out = getattr(self, f'deconv{k}')(out)
      if k < self.num_downs:
        out = [torch.cat([d, e], 1) for d, e in zip(out, enc[self.num_downs - k - 1])]
    out = self.tanh(out)
    alpha_soft = F.softmax(self.alpha, dim=0)
    ens = 0
    for m in range(self.num_parallel):
      ens = ens + alpha_soft[m] * out[m].detach()
    return out + [ens], alpha_soft

  def normal_weight_init(self, mean=0.0, std=0.02):
    for m in self.modules():
      if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, mean, std)


class Discriminator(nn.Module):
  """Official PatchGAN; forward(x, label) -> sigmoid scores, one per branch."""

  def __init__(self, input_dim=6, num_filter=64, output_dim=1):
    super().__init__()
    self.conv1 = ConvBlockShare(input_dim, num_filter, activation=False, instance_norm=False)
    self.conv2 = ConvBlockShare(num_filter, num_filter * 2)
    self.conv3 = ConvBlockShare(num_filter * 2, num_filter * 4)
    self.conv4 = ConvBlockShare(num_filter * 4, num_filter * 8, stride=1)
    self.conv5 = ConvBlockShare(num_filter * 8, output_dim, stride=1, instance_norm=False)
    self.sigmoid = ModuleParallel(nn.Sigmoid())

  def forward(self, x, label):
    if isinstance(label, list):
      x = [torch.cat([x_, l_], 1) for x_, l_ in zip(x, label)]
    else:
      x = [torch.cat([x_, label], 1) for x_ in x]
    for k in range(1, 6):
      x = getattr(self, f'conv{k}')(x)
    return self.sigmoid(x)
