"""CEN, RefineNet-LW on ResNet-101, SUN RGB-D 37 classes: the NYUDv2 recipe on SUN RGB-D."""

from cen_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.resnet = 101
  config.model.num_classes = 37
  config.data.name = 'sunrgbd'
  config.data.depth_scale = -2  # official SUN option: per-image min-max stretch of depth to [0, 255]
  return config
