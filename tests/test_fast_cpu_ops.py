"""The CPU formulation of max-pool (cen_jax/layers.py) equals XLA's reference op (reduce_window)
in values and gradients, ties included.

Integer-valued inputs and cotangents keep every sum exact in float32, so those cases compare
exactly whatever the summation order; random floats compare to a tolerance.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import layers


def reference_max_pool(x, window, stride, padding):
  pad = ((padding, padding), (padding, padding))
  return nn.max_pool(x, (window, window), (stride, stride), pad)


def value_and_vjp(fn, x, g):
  y, vjp = jax.vjp(fn, x)
  return y, vjp(g)[0]


def small_ints(rng, shape, low=0, high=3):
  """Few distinct values: windows are full of ties."""
  return jnp.asarray(rng.integers(low, high, shape).astype(np.float32))


@pytest.mark.parametrize('shape', [(2, 7, 9, 3), (1, 3, 3, 2), (1, 1, 6, 1), (3, 12, 5, 4)])
@pytest.mark.parametrize('values', ['ties', 'floats', 'constant'])
def test_separable_max_pool_equals_reduce_window(shape, values):
  rng = np.random.default_rng(sum(shape))
  if values == 'ties':
    x = small_ints(rng, shape)
  elif values == 'floats':
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  else:
    x = jnp.zeros(shape, jnp.float32)
  g = small_ints(rng, shape, -3, 4)
  y_ref, dx_ref = value_and_vjp(lambda x: reference_max_pool(x, 5, 1, 2), x, g)
  y_new, dx_new = value_and_vjp(lambda x: layers.separable_max_pool(x, 5, 2), x, g)
  np.testing.assert_array_equal(y_new, y_ref)
  np.testing.assert_array_equal(dx_new, dx_ref)


@pytest.fixture(params=['xla', 'separable'])
def pool_form(request, monkeypatch):
  """max_pool through XLA's reduce_window and through the CPU separable form (forced on the
  tests' small shapes, which it otherwise leaves to XLA)."""
  if request.param == 'separable':
    monkeypatch.setattr(layers, 'MIN_CPU_POOL_ELEMENTS', 0)
  return request.param


def test_max_pool_ties_go_to_the_first_maximum_in_row_major_order(pool_form):
  """Hand-computed: in an all-equal 2x2 image every 5x5 window holds all four pixels, so every
  output's gradient goes to pixel (0, 0) (torch's rule, and reduce_window's)."""
  x = jnp.zeros((1, 1, 2, 2, 1), jnp.float32)  # [M, N, H, W, C]
  _, vjp = jax.vjp(lambda x: layers.max_pool(x, 5, 1, 2), x)
  np.testing.assert_array_equal(vjp(jnp.ones_like(x))[0][0, 0, :, :, 0], [[4.0, 0.0], [0.0, 0.0]])
  # Row 1 holds the maximum twice: the first column of it takes every output's gradient.
  x = jnp.asarray([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]).reshape(1, 1, 2, 3, 1)
  _, vjp = jax.vjp(lambda x: layers.max_pool(x, 5, 1, 2), x)
  np.testing.assert_array_equal(vjp(jnp.ones_like(x))[0][0, 0, :, :, 0],
                                [[0.0, 0.0, 0.0], [6.0, 0.0, 0.0]])


@pytest.mark.parametrize('window,stride,padding', [(5, 1, 2), (3, 2, 1), (3, 1, 1)])
def test_max_pool_layer_equals_reference(window, stride, padding, pool_form):
  rng = np.random.default_rng(window + stride)
  x = small_ints(rng, (2, 3, 8, 6, 4))
  g_shape = jax.eval_shape(lambda x: layers.max_pool(x, window, stride, padding), x).shape
  g = small_ints(rng, g_shape, -2, 3)
  ref = lambda x: layers.unfold(reference_max_pool(layers.fold(x), window, stride, padding), 2)
  y_ref, dx_ref = value_and_vjp(ref, x, g)
  y_new, dx_new = value_and_vjp(lambda x: layers.max_pool(x, window, stride, padding), x, g)
  np.testing.assert_array_equal(y_new, y_ref)
  np.testing.assert_array_equal(dx_new, dx_ref)
