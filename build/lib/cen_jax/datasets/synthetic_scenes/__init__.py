"""Procedural RGB-D scenes for the cen-jax demo (no download)."""
