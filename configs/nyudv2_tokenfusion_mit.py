"""TokenFusion, SegFormer MiT-B0..B5 with the SegFormer head, NYUDv2 40 classes, RGB + depth: the
official recipe (yikaiw/TokenFusion semantic_segmentation: main.py, config.py, README).

`--config configs/nyudv2_tokenfusion_mit.py:b3` (or :b0 .. :b5; the default is b3, the backbone of
the official README command and of its reported 54.8 mIoU; the official main.py's own default is
mit_b1). Batch 6, 500x500 crops from the shorter side resized to 350 and scaled by 0.5-2.0 (as
CEN), 3 stages x 100 epochs, PolyWarmupAdamW restarted per stage (lr 6e-5 / 3e-5 / 1.5e-5, decoder
10x, weight decay 0.01 but on the encoder norms, warm-up 1,500 iterations from 1e-6, poly power 1
to 40,000), token threshold 0.02, score L1 added once per step (not per output), the head's BN
frozen, drop path 0.1, ImageNet initialisation (set config.model.init_from to the official
SegFormer weights, e.g. 'pretrained/mit_b3.pth', or its .npz).
"""

from cen_jax import config as config_lib

SIZES = ('b0', 'b1', 'b2', 'b3', 'b4', 'b5')


def get_config(size: str = 'b3'):
  if size not in SIZES:
    raise ValueError(f'configs/nyudv2_tokenfusion_mit.py:{size}: expected a MiT size, one of '
                     f'{", ".join(SIZES)}')
  config = config_lib.base_config()
  m = config.model
  m.backbone = f'mit_{size}'
  m.fusion = 'tokenfusion'
  m.threshold = 0.02  # official TokenExchange mask_threshold
  m.dropout = 0.1  # the head's Dropout2d
  m.init_from = ''  # e.g. f'pretrained/mit_{size}.pth'

  t = config.train
  t.optimizer = 'adamw'
  t.stage_epochs = (100, 100, 100)
  t.lr_enc = (6e-5, 3e-5, 1.5e-5)
  t.lr_dec = (6e-4, 3e-4, 1.5e-4)
  t.wd_enc = 0.01
  t.wd_dec = 0.01
  # The official README trains with --lamda 1e-6 (the command behind its table); main.py's
  # default is 1e-4. The penalty is the sum of |score| over every block, branch and token.
  t.l1_lambda = 1e-6
  t.l1_per_output = False  # official: lamda * L1 once, after the loop over the outputs
  return config
