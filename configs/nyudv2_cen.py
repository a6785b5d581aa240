"""CEN, RefineNet-LW on ResNet-50/101/152, NYUDv2 40 classes, RGB + depth: the official recipe.

`--config configs/nyudv2_cen.py:101` (or :50, :152; the default is 101). Batch 6, 500x500
crops, 3 stages x 100 epochs (ResNet-152: 3 x 150), SGD (encoder lr 5e-4/2.5e-4/1e-4, decoder
3e-3/1.5e-3/7e-4, momentum 0.9, wd 1e-5), L1 lambda 2e-4 on the partitioned bn2 scales,
threshold 2e-2, frozen BN, ImageNet initialisation (set config.model.init_from to the
torchvision ResNet file, .pth or converted .npz).
"""

from cen_jax import config as config_lib

# The torchvision ImageNet weights each depth starts from (config.model.init_from).
TORCHVISION_FILES = {50: 'resnet50-19c8e357.pth', 101: 'resnet101-5d3b4d8f.pth',
                     152: 'resnet152-b121ed2d.pth'}


def get_config(depth: str = '101'):
  if not str(depth).isdigit() or int(depth) not in TORCHVISION_FILES:
    raise ValueError(f'configs/nyudv2_cen.py:{depth}: expected a ResNet depth, one of '
                     f'{", ".join(map(str, TORCHVISION_FILES))}')
  config = config_lib.base_config()
  config.model.resnet = int(depth)
  if int(depth) == 152:
    config.train.stage_epochs = (150, 150, 150)
  config.model.init_from = ''  # e.g. 'weights/' + TORCHVISION_FILES[depth]
  return config
