"""AsymFusion (channel shuffle + pixel shift in the last bottleneck of each stage), ResNet-101,
NYUDv2: the CEN recipe without exchange, threshold or L1 (docs/papers.md §3.3)."""

from cen_jax import config as config_lib


def get_config():
  config = config_lib.base_config()
  config.model.resnet = 101
  config.model.fusion = 'asymfusion'
  config.train.l1_lambda = 0.0
  return config
