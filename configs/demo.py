"""Demo: a small CEN (RGB + depth) on the embedded synthetic RGB-D scenes, CPU-sized.

The dataset (data/synthetic_scenes) has colour-only and depth-only classes, so neither
modality alone can solve it. Same recipe as the paper (shared convs, private BN, exchange on
bn2, L1 on the partitioned scales, per-branch + ensemble losses, SGD in stages with optimiser
reset), shrunk to run in minutes: narrow widths, 64x64 images, BN statistics trained (there is no
ImageNet initialisation to freeze), and a larger L1 weight so that scales cross the threshold
within the short schedule.
"""

from cen_jax import config as config_lib


def get_config(single_input: str = ''):
  """The CEN demo; `configs/demo.py:rgb` or `:depth`, its single-modality baselines."""
  if single_input:
    return one_input(single_input)
  config = config_lib.base_config()
  config.seed = 0
  config.modalities = ('rgb', 'depth')

  m = config.model
  m.blocks = (1, 1, 1, 1)
  m.stem_width = 16
  m.widths = (8, 16, 16, 16)
  m.decoder_widths = (16, 16)
  m.num_classes = 7  # data/synthetic_scenes NUM_CLASSES
  m.frozen_bn = False
  m.dropout = 0.1
  m.threshold = 2e-2

  d = config.data
  d.name = 'synthetic_scenes'
  d.builder_config = 'default'  # 64x64, 1000 train / 200 test
  d.crop_size = 64
  d.shorter_side = 48
  d.low_scale = 0.75
  d.high_scale = 1.5
  d.eval_batch_size = 25

  t = config.train
  t.batch_size = 8  # 125 steps per epoch
  t.cpu_async_dispatch = True  # 41 MiB of temporaries a step: 5-17% more steps/s than without
  t.stage_epochs = (12, 4)  # 2,000 steps
  t.lr_enc = (0.01, 0.002)
  t.lr_dec = (0.01, 0.002)
  t.l1_lambda = 5e-3
  t.eval_every_epochs = 4  # every 500 steps
  t.log_every_steps = 25
  t.checkpoint_every_steps = 250

  # Final mIoU (output, metric, mean, std) over seeds 0-2 on a 2-core Intel Xeon (AVX-512),
  # Python 3.12 + JAX 0.12: `--mode check` compares a finished run with these (docs/demo.md).
  config.expected = (('rgb', 'miou', 91.14, 0.65), ('depth', 'miou', 91.69, 0.67),
                     ('ensemble', 'miou', 92.15, 0.60))
  return config


def one_input(modality):
  """The demo's network, data and budget on one input (M = 1): the single-modality baselines.
  A single branch has nothing to exchange with, so fusion is 'none' and the L1 term is off."""
  if modality not in ('rgb', 'depth'):
    raise ValueError(f'configs/demo.py:{modality}: expected rgb or depth (a single-input '
                     f'baseline), or no argument')
  config = get_config()
  config.modalities = (modality,)
  config.model.fusion = 'none'
  config.train.l1_lambda = 0.0
  mean, std = ONE_INPUT_MIOU[modality]  # the branch is the ensemble: the same figure
  config.expected = ((modality, 'miou', mean, std), ('ensemble', 'miou', mean, std))
  return config


# Final mIoU (mean, std) of the single-input baselines over seeds 0-2, measured as the CEN row.
ONE_INPUT_MIOU = {'rgb': (60.97, 0.45), 'depth': (36.72, 0.59)}
