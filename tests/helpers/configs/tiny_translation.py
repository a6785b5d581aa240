"""A seconds-fast end-to-end translation config: tiny CEN on the 'tiny' synthetic domains."""

from cen_jax.configs import demo_translation


def get_config():
  config = demo_translation.get_config()
  config.data.builder_config = 'tiny'
  config.data.crop_size = 32  # the PatchGAN needs >= 32
  config.data.load_size = 36
  config.data.eval_batch_size = 2
  config.model.ngf = 4
  config.model.ndf = 4
  config.train.batch_size = 4  # 2 steps per epoch
  config.train.num_epochs = 4
  config.train.eval_every_epochs = 2
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 1
  config.train.num_previews = 2
  return config
