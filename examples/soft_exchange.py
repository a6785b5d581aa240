"""A fusion written outside the package: soft channel exchange.

Instead of CEN's hard switch at |scale| < threshold, every channel mixes its own value with the
mean of the other branches, weighted by a sigmoid of its private norm scale: a channel whose
|scale| is well above the threshold keeps its value, one near zero takes the others'. Train it
with `--config.model.fusion_module=examples/soft_exchange.py --config.model.fusion=soft_exchange`.
"""

import jax
import jax.numpy as jnp

from cen_jax.fusion import ops, registry


def soft_exchange(x, site):
  """x: [M, N, H, W, C] after the private norm; site.scale: its [M, C] scales."""
  sharpness = float(site.options.get('sharpness', 10.0))
  keep = jax.nn.sigmoid(sharpness * (jnp.abs(site.scale) / site.threshold - 1.0))
  keep = keep.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)).astype(x.dtype)
  return keep * x + (1 - keep) * ops.mean_of_others(x)


# The CEN penalty drives a disjoint part of each branch's scales towards zero, as for 'cen'.
registry.register('soft_exchange', points={'bn2': soft_exchange, 'norm': soft_exchange},
                  penalty=registry.partitioned_l1,
                  description='soft exchange: mix with the others by sigmoid(|scale|)')
