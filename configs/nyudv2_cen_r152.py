"""CEN, RefineNet-LW on ResNet-152, NYUDv2 40 classes: as nyudv2_cen_r101 with 3 x 150 epochs."""

from cen_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.resnet = 152
  config.train.stage_epochs = (150, 150, 150)
  config.model.init_from = ''  # e.g. 'weights/resnet152-b121ed2d.pth'
  return config
