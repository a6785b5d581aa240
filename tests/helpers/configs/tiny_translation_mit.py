"""A seconds-fast end-to-end translation config on Mix Transformer branches: tiny_translation.py's
data and schedule with TokenFusion's generator and discriminator at widths 4, 8, 8, 8, 16, one
block per stage; stochastic depth on (0.1), so resumed runs must replay its masks."""

from tests.helpers.configs import tiny_translation


def get_config():
  config = tiny_translation.get_config()
  m = config.model
  m.backbone = 'mit_b0'
  m.fusion = 'tokenfusion'
  m.threshold = 0.02
  m.mit_embed_dims = (4, 8, 8, 8, 16)
  m.mit_depths = (1, 1, 1, 1, 1)
  m.mit_sr_ratios = (2, 2, 1, 1, 1)  # stage maps 16, 8, 4, 2, 1 at 32x32
  config.train.lr_times_batch = True
  return config
