"""cen-jax: channel-exchanging multimodal networks (CEN, AsymFusion) in JAX/Flax."""
