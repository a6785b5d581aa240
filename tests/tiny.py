"""A tiny CEN config shared by the training tests (CPU-fast)."""

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
