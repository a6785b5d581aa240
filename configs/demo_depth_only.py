"""Baseline for the demo: the same network, data and budget with depth only (M = 1)."""

from configs import demo


def get_config():
  return demo.one_input('depth')
