"""A seconds-fast end-to-end config: tiny CEN on the 'tiny' synthetic scenes (8 train, 6 test)."""

from cen_jax.configs import demo


def get_config():
  config = demo.get_config()
  config.data.builder_config = 'tiny'  # 16x20 images
  config.data.crop_size = 16
  config.data.shorter_side = 12
  config.data.eval_batch_size = 2
  config.model.blocks = (1, 1, 1, 1)
  config.model.stem_width = 8
  config.model.widths = (4, 8, 8, 8)
  config.model.decoder_widths = (8, 8)
  config.model.dropout = 0.5  # exercised: resumed runs must replay the same dropout masks
  config.train.batch_size = 4  # 2 steps per epoch
  config.train.stage_epochs = (2, 2)  # a stage boundary (optimiser reset) at step 4
  config.train.eval_every_epochs = 2
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 1
  config.train.num_previews = 2
  return config
