"""Baseline for the multitask demo (configs/demo_dense.py:multitask): the segmentation demo's
network, data and budget on the defocus image alone, with no depth or normals task (M = 1)."""

from cen_jax.configs import demo


def get_config():
  return demo.one_input('defocus')
