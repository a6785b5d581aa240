"""Baseline for the translation demo: the same network, data and budget from reshading only
(M = 1: nothing to exchange with, so fusion is 'none' and the sparsity term is off)."""

from configs import demo_translation


def get_config():
  config = demo_translation.get_config()
  config.modalities = ('reshading',)
  config.model.fusion = 'none'
  config.train.l1_lambda = 0.0
  return config
