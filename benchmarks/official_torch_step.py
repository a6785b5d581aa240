"""Worker for benchmarks/train_step.py: the official CEN PyTorch train step (or forward pass),
built from the official repository's own model code, driven over stdin/stdout.

Runs under a Python that has torch (e.g. .venv-torch/bin/python); imports nothing from cen_jax.
`--official_repo` is a checkout of yikaiw/CEN or its bare git dir; its `semantic_segmentation`
folder is extracted to a temporary directory and imported from there.

The step is the body of the official `main.train` (semantic_segmentation/main.py) on CPU:
frozen BN (BatchNorm modules in eval mode), NLLLoss(ignore 255) of LogSoftmax of every output
(M branches + ensemble) bilinearly upsampled to the label size, lamda * L1 of the partitioned
bn2 scales once per output, and the two SGD optimisers (encoder / decoder) of
`create_optimisers`.

Protocol (one JSON object per line): {"cmd": "setup", ...case} -> {"params", "first_s"};
{"cmd": "run"} -> {"seconds", "cpu_s"}; {"cmd": "memory"} -> {"peak_rss_mib"}; {"cmd": "quit"}.
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ENCODER_PARAM = re.compile('.*conv1.*|.*bn1.*|.*layer.*')  # official main.py
IGNORE_LABEL = 255


def extract_official(repo: str, dest: str) -> str:
  """Path of an importable `semantic_segmentation` folder of the official repository."""
  checkout = os.path.join(repo, 'semantic_segmentation')
  if os.path.isdir(checkout):
    return checkout
  archive = subprocess.run(['git', '--git-dir', repo, 'archive', 'HEAD', 'semantic_segmentation'],
                           check=True, capture_output=True).stdout
  subprocess.run(['tar', '-x', '-C', dest], input=archive, check=True)
  return os.path.join(dest, 'semantic_segmentation')


def synthetic_batch(case, seed=0):
  """The cen-jax worker's batch (train_step.synthetic_batch) as torch tensors: M images
  [N, 3, H, W] and an int64 mask [N, H, W]."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import train_step  # stdlib-only at import time; numpy inside
  x, mask = train_step.synthetic_batch(case, seed)
  inputs = [torch.from_numpy(np.ascontiguousarray(x[i].transpose(0, 3, 1, 2)))
            for i in range(x.shape[0])]
  return inputs, torch.from_numpy(mask.astype(np.int64))


def slim_params(model):
  """The official L1 list: half of every bn2 weight, alternating first / second half."""
  out = []
  for name, param in model.named_parameters():
    if param.requires_grad and name.endswith('weight') and 'bn2' in name:
      half = len(param) // 2
      out.append(param[:half] if len(out) % 2 == 0 else param[half:])
  return out


def optimisers(model, case):
  enc = [p for n, p in model.named_parameters() if ENCODER_PARAM.match(n)]
  dec = [p for n, p in model.named_parameters() if not ENCODER_PARAM.match(n)]
  return (torch.optim.SGD(enc, lr=case['lr_enc'], momentum=0.9, weight_decay=1e-5),
          torch.optim.SGD(dec, lr=case['lr_dec'], momentum=0.9, weight_decay=1e-5))


def freeze_bn(model) -> None:
  """Official FREEZE_BN: training mode but every BatchNorm in eval mode."""
  model.train()
  for module in model.modules():
    if isinstance(module, nn.BatchNorm2d):
      module.eval()


def upsampled_nll(crit, output, target):
  """The official segmentation loss of one output: NLL of the log-softmax of the logits
  bilinearly upsampled to the label size."""
  output = F.interpolate(output, size=target.size()[1:], mode='bilinear', align_corners=False)
  return crit(F.log_softmax(output, dim=1), target)


class OfficialStep:
  def __init__(self, official_dir, case):
    sys.path.insert(0, official_dir)
    from models.model import refinenet  # the official model code
    torch.manual_seed(0)
    self.case = case
    self.model = refinenet(case['resnet'], case['classes'], case['branches'], 2e-2)
    self.inputs, self.target = synthetic_batch(case)
    if case['mode'] == 'train':
      freeze_bn(self.model)
      self.optims = optimisers(self.model, case)
      self.crit = nn.NLLLoss(ignore_index=IGNORE_LABEL)
    else:
      self.model.eval()

  def params(self) -> int:
    return sum(p.numel() for p in self.model.parameters())

  def __call__(self):
    if self.case['mode'] == 'forward':
      with torch.no_grad():
        outputs, _ = self.model(self.inputs)
      return
    slim = slim_params(self.model)
    outputs, _ = self.model(self.inputs)
    loss = 0
    for output in outputs:
      loss += upsampled_nll(self.crit, output, self.target)
      loss += 2e-4 * sum(torch.abs(p).sum() for p in slim)
    for opt in self.optims:
      opt.zero_grad()
    loss.backward()
    for opt in self.optims:
      opt.step()
    loss.item()


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(step_class=None):
  """The worker protocol around `step_class(official_dir, case)` (default OfficialStep)."""
  step_class = step_class or OfficialStep
  parser = argparse.ArgumentParser()
  parser.add_argument('--official_repo', required=True)
  args = parser.parse_args()
  step = None
  with tempfile.TemporaryDirectory() as tmp:
    official_dir = extract_official(args.official_repo, tmp)
    for line in sys.stdin:
      msg = json.loads(line)
      if msg['cmd'] == 'setup':
        step = step_class(official_dir, msg['case'])
        start = time.perf_counter()
        step()
        reply = {'params': step.params(), 'first_s': time.perf_counter() - start,
                 'version': torch.__version__, 'threads': torch.get_num_threads()}
      elif msg['cmd'] == 'run':
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        step()
        reply = {'seconds': time.perf_counter() - start}
        after = resource.getrusage(resource.RUSAGE_SELF)
        reply['cpu_s'] = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
      elif msg['cmd'] == 'memory':
        reply = {'peak_rss_mib': peak_rss_mib()}
      else:
        return
      print(json.dumps(reply), flush=True)


if __name__ == '__main__':
  main()
