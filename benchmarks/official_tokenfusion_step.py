"""Worker for benchmarks/train_step.py: the official TokenFusion RGB-D segmentation train step,
built from the official repository's own model code (yikaiw/TokenFusion semantic_segmentation:
models/{mix_transformer, modules, segformer}.py, utils/optimizer.py), driven over stdin/stdout
with the protocol of benchmarks/official_torch_step.py.

Needs torch only. The official code imports two packages that do not import here, and gets
stand-ins computing the same: timm (`timm.models.layers`: DropPath, to_2tuple, trunc_normal_;
timm imports torchvision's compiled ops, which the CPU torch wheel here lacks), and mmcv's
ConvModule (conv without bias, bn, activate; mmcv's compiled ops do not install).

The step is the body of the official `main.train` on CPU: frozen BN (FREEZE_BN), NLLLoss(ignore
255) of LogSoftmax of every output (M = 2 branches + ensemble) bilinearly upsampled to the label
size, lamda (1e-4) times the L1 of every token score map, and `PolyWarmupAdamW` with the three
official parameter groups of stage 1 (lr 6e-5, decoder x10, no weight decay on encoder norms).
"""

import os
import sys
import types

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_torch_step as worker  # noqa: E402  (the protocol, the batch)

LAMDA = 1e-4  # official config.LAMDA
STAGE_LR = 6e-5  # official main.py lrs[0]


class ConvModule(nn.Module):
  """mmcv.cnn.ConvModule(in, out, kernel_size, norm_cfg=BN) as the official head builds it:
  conv (no bias: a norm follows), bn, activate (ReLU)."""

  def __init__(self, in_channels, out_channels, kernel_size, norm_cfg=None, **kwargs):
    super().__init__()
    del norm_cfg, kwargs
    self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False)
    nn.init.kaiming_normal_(self.conv.weight, mode='fan_out', nonlinearity='relu')
    self.bn = nn.BatchNorm2d(out_channels)
    self.activate = nn.ReLU(inplace=True)

  def forward(self, x):
    return self.activate(self.bn(self.conv(x)))


class DropPath(nn.Module):
  """timm's DropPath: per sample, zero the residual branch with probability p, else / (1 - p)."""

  def __init__(self, drop_prob=0.0):
    super().__init__()
    self.drop_prob = drop_prob

  def forward(self, x):
    if self.drop_prob == 0.0 or not self.training:
      return x
    keep = 1.0 - self.drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def install_stand_ins():
  """sys.modules entries for mmcv.cnn and timm.models.layers."""
  def module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules.setdefault(name, mod)
    return mod
  module('mmcv', cnn=module('mmcv.cnn', ConvModule=ConvModule))
  layers = module('timm.models.layers', DropPath=DropPath, to_2tuple=lambda x: (x, x),
                  trunc_normal_=nn.init.trunc_normal_)
  module('timm', models=module('timm.models', layers=layers))


class OfficialTokenFusionStep:
  def __init__(self, official_dir, case):
    install_stand_ins()
    sys.path.insert(0, official_dir)
    from models import WeTr  # the official model code
    from utils.optimizer import PolyWarmupAdamW
    torch.manual_seed(0)
    self.case = case
    self.model = WeTr(case['backbone'], num_classes=case['classes'], embedding_dim=256,
                      pretrained=False)
    self.inputs, self.target = worker.synthetic_batch(case)
    if case['mode'] == 'train':
      worker.freeze_bn(self.model)
      groups = self.model.get_param_groups()
      self.optimizer = PolyWarmupAdamW(
          params=[{'params': groups[0], 'lr': STAGE_LR, 'weight_decay': 0.01},
                  {'params': groups[1], 'lr': STAGE_LR, 'weight_decay': 0.0},
                  {'params': groups[2], 'lr': STAGE_LR * 10, 'weight_decay': 0.01}],
          lr=STAGE_LR, weight_decay=0.01, betas=[0.9, 0.999], warmup_iter=1500,
          max_iter=40000, warmup_ratio=1e-6, power=1.0)
      self.crit = nn.NLLLoss(ignore_index=worker.IGNORE_LABEL)
    else:
      self.model.eval()

  def params(self) -> int:
    return sum(p.numel() for p in self.model.parameters())

  def __call__(self):
    if self.case['mode'] == 'forward':
      with torch.no_grad():
        self.model(self.inputs)
      return
    outputs, masks = self.model(self.inputs)
    loss = sum(worker.upsampled_nll(self.crit, output, self.target) for output in outputs)
    loss += LAMDA * sum(sum(torch.abs(m).sum() for m in mask) for mask in masks)
    self.optimizer.zero_grad()
    loss.backward()
    self.optimizer.step()
    loss.item()


if __name__ == '__main__':
  worker.main(OfficialTokenFusionStep)
