"""A fusion that makes every loss non-finite (tests of the ablation runner's divergence report)."""

import jax.numpy as jnp

from cen_jax.fusion import registry


def blow_up(x, site):
  del site
  return x * jnp.inf


registry.register('diverge', points={'output': blow_up},
                 description='test only: every activation becomes inf/nan')
