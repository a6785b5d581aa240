"""Demo: TokenFusion's segmenter (a narrow MiT-B0 and the SegFormer head) on the embedded synthetic
RGB-D scenes, CPU-sized: `--config configs/demo_mit.py:<fusion>`, fusion one of FUSIONS
(default tokenfusion). Data, crops, batch and budget of configs/demo.py; the network is MiT-B0's
depths (2, 2, 2, 2) at widths 16, 32, 80, 128 with a 64-wide head; the official PolyWarmupAdamW
recipe with learning rates for training from scratch and a short warm-up and decay. Not yet
calibrated: no expected figures (`--mode check` has nothing to compare).
"""

from cen_jax.configs import demo

FUSIONS = ('tokenfusion', 'cen', 'asymfusion', 'none')


def get_config(fusion: str = 'tokenfusion'):
  if fusion not in FUSIONS:
    raise ValueError(f'configs/demo_mit.py:{fusion}: expected one of {", ".join(FUSIONS)}')
  config = demo.get_config()
  config.expected = ()
  m = config.model
  m.backbone = 'mit_b0'
  m.mit_embed_dims = (16, 32, 80, 128)  # heads 1, 2, 5, 8: 16 channels each
  m.embedding_dim = 64
  m.fusion = fusion
  m.dropout = 0.1
  m.frozen_bn = False  # no ImageNet initialisation to freeze
  m.threshold = 0.02 if fusion == 'tokenfusion' else config.model.threshold

  t = config.train
  t.optimizer = 'adamw'
  t.lr_enc = (1e-3, 2e-4)
  t.lr_dec = (1e-2, 2e-3)  # official: the decoder at 10x
  t.wd_enc = t.wd_dec = 0.01
  t.warmup_steps = 100
  t.poly_steps = 1500  # the first stage's length (12 epochs of 125 steps)
  t.l1_per_output = fusion != 'tokenfusion'
  t.l1_lambda = {'tokenfusion': 1e-4, 'cen': config.train.l1_lambda}.get(fusion, 0.0)
  return config
