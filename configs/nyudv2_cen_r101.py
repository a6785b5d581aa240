"""CEN, RefineNet-LW on ResNet-101, NYUDv2 40 classes, RGB + depth: the official recipe.

Batch 6, 500x500 crops, 3 stages x 100 epochs, SGD (encoder lr 5e-4/2.5e-4/1e-4, decoder
3e-3/1.5e-3/7e-4, momentum 0.9, wd 1e-5), L1 lambda 2e-4 on the partitioned bn2 scales,
threshold 2e-2, frozen BN, ImageNet initialisation (set config.model.init_from to the
torchvision resnet101 file, .pth or converted .npz).
"""

from cen_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.resnet = 101
  config.model.init_from = ''  # e.g. 'weights/resnet101-5d3b4d8f.pth'
  return config
