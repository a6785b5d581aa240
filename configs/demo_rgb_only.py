"""Baseline for the demo: the same network, data and budget with RGB only (M = 1).

A single branch has nothing to exchange with, so fusion is 'none' and the L1 term is off.
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.modalities = ('rgb',)
  config.model.fusion = 'none'
  config.train.l1_lambda = 0.0
  return config
