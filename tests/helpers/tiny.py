"""Tiny configs shared by the training tests (CPU-fast)."""

from cen_jax import config as config_lib


def tiny_config(**model_overrides):
  config = config_lib.base_config()
  m = config.model
  m.blocks = (1, 1, 2, 1)
  m.stem_width = 8
  m.widths = (4, 8, 8, 8)
  m.decoder_widths = (8, 8)
  m.num_classes = 5
  m.frozen_bn = False
  m.dropout = 0.0
  m.threshold = 0.5  # high enough that some channels exchange after a few steps
  for k, v in model_overrides.items():
    m[k] = v
  config.train.batch_size = 8
  config.train.stage_epochs = (1, 1)
  config.train.lr_enc = (0.05, 0.01)
  config.train.lr_dec = (0.1, 0.02)
  config.train.l1_lambda = 1e-2
  return config


def tiny_translation_config():
  """A tiny CEN translator: 2 input domains, 32x32 images (5 U-Net levels), widths 4."""
  config = config_lib.translation_config()
  config.modalities = ('reshading', 'edge_texture')
  config.data.target = 'rgb'
  config.data.crop_size = 32  # the PatchGAN needs >= 32
  config.data.load_size = 36
  m = config.model
  m.ngf = 4
  m.ndf = 4
  m.threshold = 0.5
  config.train.batch_size = 8
  config.train.num_epochs = 2
  config.train.l1_lambda = 1e-2
  return config


def tiny_mit_translation_config(fusion: str = 'tokenfusion'):
  """tiny_translation_config's data and schedule with TokenFusion's MiT generator and
  discriminator at widths 4, 8, 8, 8, 16 (heads 1, 2, 4, 8, 16), one block per stage."""
  config = tiny_translation_config()
  m = config.model
  m.backbone = 'mit_b0'
  m.fusion = fusion
  m.mit_embed_dims = (4, 8, 8, 8, 16)
  m.mit_depths = (1, 1, 1, 1, 1)
  m.mit_sr_ratios = (2, 2, 1, 1, 1)  # stage maps 16, 8, 4, 2, 1 at 32x32
  if fusion == 'tokenfusion':
    m.threshold = 0.02
  return config
