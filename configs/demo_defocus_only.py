"""Baseline for the multitask demo (configs/demo_dense.py:multitask): the segmentation demo's
network, data and budget on the defocus image alone, with no depth or normals task (M = 1).

A single branch has nothing to exchange with, so fusion is 'none' and the L1 term is off.
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.modalities = ('defocus',)
  config.model.fusion = 'none'
  config.train.l1_lambda = 0.0
  return config
