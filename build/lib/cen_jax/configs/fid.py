"""Defaults for `main.py --mode fid` when no --config is given: only config.eval is read
(inception_weights; --config.eval.inception_weights=FILE sets it)."""

from cen_jax import config as config_lib


def get_config():
  return config_lib.translation_config()
