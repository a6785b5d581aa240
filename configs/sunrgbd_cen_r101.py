"""CEN, RefineNet-LW on ResNet-101, SUN RGB-D 37 classes: the NYUDv2 recipe on SUN RGB-D."""

from cen_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.resnet = 101
  config.model.num_classes = 37
  config.data.name = 'sunrgbd'
  return config
