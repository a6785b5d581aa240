"""Experiment configs (ml_collections, one get_config each; `file.py:arg` passes an argument).
Installed as the package cen_jax.configs, so configs import each other as cen_jax.configs.<name>."""
