"""The CPU formulations (cen_jax/layers.py) equal XLA's reference ops in values and gradients:
max-pool against reduce_window (ties included), the matmul kernel gradients of a convolution
(per tap, shifted cotangent, Winograd) against XLA's convolution gradient and a numpy loop.

Integer-valued inputs and cotangents keep every sum exact in float32, so those cases compare
exactly whatever the summation order; random floats compare to a tolerance.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax import layers
from cen_jax import winograd


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


def numpy_kernel_grad(x, g, k, padding):
  """dK[i, j, c, d] = sum over n, h, w of x_padded[n, h + i, w + j, c] g[n, h, w, d], in float64."""
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  _, h, w, _ = g.shape
  return np.stack([np.stack([np.einsum('nhwc,nhwd->cd', xp[:, i:i + h, j:j + w], g)
                             for j in range(k)]) for i in range(k)])


@pytest.mark.parametrize('k,padding,shape', [(3, 1, (2, 7, 5, 6)), (3, 0, (1, 6, 9, 4)),
                                             (5, 2, (3, 4, 4, 2)), (2, 1, (2, 5, 3, 3))])
@pytest.mark.parametrize('values', ['ints', 'floats'])
@pytest.mark.parametrize('cout', [5, 1])  # 5: Winograd (3x3) or per tap; 1: shifted cotangent
def test_matmul_kernel_grad_equals_xla_and_numpy(k, padding, shape, values, cout):
  rng = np.random.default_rng(k + padding + shape[0])
  kernel_shape = (k, k, shape[-1], cout)
  if values == 'ints':  # exact in float32 whatever the order of the sums
    x, kernel = small_ints(rng, shape, -2, 3), small_ints(rng, kernel_shape, -2, 3)
  else:
    x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    kernel = jnp.asarray(rng.standard_normal(kernel_shape).astype(np.float32))
  reference = lambda x, kernel: layers.conv(x, kernel, 1, padding)
  g_shape = jax.eval_shape(reference, x, kernel).shape
  g = small_ints(rng, g_shape, -3, 4) if values == 'ints' else jnp.asarray(
      rng.standard_normal(g_shape).astype(np.float32))
  y_ref, vjp_ref = jax.vjp(reference, x, kernel)
  y_new, vjp_new = jax.vjp(lambda x, kernel: layers.conv_matmul_kernel_grad(x, kernel, padding),
                           x, kernel)
  (dx_ref, dk_ref), (dx_new, dk_new) = vjp_ref(g), vjp_new(g)
  np.testing.assert_array_equal(y_new, y_ref)
  np.testing.assert_array_equal(dx_new, dx_ref)  # the same XLA op
  dk_numpy = numpy_kernel_grad(x, g, k, padding)
  if values == 'ints':
    np.testing.assert_array_equal(dk_new, dk_ref)
    np.testing.assert_array_equal(dk_new, dk_numpy)
  else:
    np.testing.assert_allclose(dk_new, dk_numpy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dk_ref, dk_numpy, rtol=1e-5, atol=1e-5)


def test_winograd_matrices_are_the_minimal_filtering_identity():
  """F(2, 3) in 1-D: A^T [(G k) * (B^T d)] is the correlation of the 4-vector d with the
  3-tap k, (d0 k0 + d1 k1 + d2 k2, d1 k0 + d2 k1 + d3 k2), for random d and k."""
  rng = np.random.default_rng(0)
  for _ in range(5):
    d, k = rng.standard_normal(4), rng.standard_normal(3)
    direct = np.array([d[0:3] @ k, d[1:4] @ k])
    winograd_form = winograd.A.T @ ((winograd.G @ k) * (winograd.B_T @ d))
    np.testing.assert_allclose(winograd_form, direct, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('shape,padding', [((2, 8, 6, 5), 1), ((1, 7, 5, 3), 1), ((2, 9, 8, 4), 0),
                                           ((1, 5, 6, 2), 2), ((3, 1, 1, 2), 1)])
def test_winograd_kernel_grad_equals_numpy(shape, padding):
  """Even and odd outputs (odd ones get a zero row/column of cotangent), paddings 0 to 2:
  exact on small integers, within float32 rounding on random floats."""
  rng = np.random.default_rng(shape[1] * 10 + padding)
  h_out, w_out = shape[1] + 2 * padding - 2, shape[2] + 2 * padding - 2
  x = small_ints(rng, shape, -3, 4)
  g = small_ints(rng, (shape[0], h_out, w_out, 3), -3, 4)
  dk = winograd.kernel_grad_3x3(x, g, padding)
  np.testing.assert_array_equal(dk, numpy_kernel_grad(x, g, 3, padding))
  x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  g = jnp.asarray(rng.standard_normal(g.shape).astype(np.float32))
  np.testing.assert_allclose(winograd.kernel_grad_3x3(x, g, padding),
                             numpy_kernel_grad(x, g, 3, padding), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('form', ['winograd', 'shifted cotangent', 'per tap'])
def test_every_matmul_kernel_grad_form_equals_numpy(form):
  """Each form `layers.matmul_kernel_grad` can be asked for, on one 3x3 case, exactly on
  small integers (benchmarks/conv_grad.py times them all); an unknown form is an error."""
  rng = np.random.default_rng(3)
  x = small_ints(rng, (2, 6, 7, 4), -3, 4)
  g = small_ints(rng, (2, 6, 7, 3), -3, 4)
  np.testing.assert_array_equal(layers.matmul_kernel_grad(x, g, (3, 3), 1, form),
                                numpy_kernel_grad(x, g, 3, 1))
  with pytest.raises(ValueError, match="form='im2col'"):
    layers.matmul_kernel_grad(x, g, (3, 3), 1, 'im2col')


def shared_conv_case(seed):
  """x [M, N, H, W, C] = [2, 2, 6, 5, 4] (4 images, 120 output rows) and a function giving a
  SharedConv(6, 3, padding 1, bias)'s value and gradients on it, with small-integer weights and
  cotangent; the form is chosen when the function is called."""
  rng = np.random.default_rng(seed)
  x = small_ints(rng, (2, 2, 6, 5, 4))
  conv = layers.SharedConv(6, 3, 1, 1, use_bias=True)
  variables = jax.tree.map(lambda v: small_ints(rng, v.shape, -2, 3),
                           conv.init(jax.random.key(0), x))
  g = small_ints(rng, (2, 2, 6, 5, 6), -2, 3)

  def grads():
    y, vjp = jax.vjp(lambda v, x: conv.apply(v, x), variables, x)
    return y, vjp(g)

  return x, grads


def test_shared_conv_kernel_gradient_form_is_chosen_by_channels(monkeypatch):
  """SharedConv takes the matmul kernel gradient on CPU from MIN_MATMUL_GRAD_CHANNELS input
  channels, for stride 1 only; the layer's value and gradients equal XLA's form."""
  x, grads = shared_conv_case(seed=3)
  calls = []
  original = layers.conv_matmul_kernel_grad
  monkeypatch.setattr(layers, 'conv_matmul_kernel_grad',
                      lambda *a: calls.append(a[1].shape) or original(*a))
  y_xla, grads_xla = grads()
  assert not calls  # 4 input channels: XLA's gradient
  monkeypatch.setattr(layers, 'MIN_MATMUL_GRAD_CHANNELS', 4)
  y_matmul, grads_matmul = grads()
  assert calls == [(3, 3, 4, 6)]
  np.testing.assert_array_equal(y_matmul, y_xla)
  jax.tree.map(np.testing.assert_array_equal, grads_matmul, grads_xla)
  calls.clear()
  layers.SharedConv(6, 3, 2, 1).init(jax.random.key(0), x)  # strided: XLA's
  assert not calls


def numpy_conv(x, kernel, stride, padding):
  """y[n, h, w, d] = sum over i, j, c of x_padded[n, s h + i, s w + j, c] kernel[i, j, c, d]."""
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  k = kernel.shape[0]
  ho = (xp.shape[1] - k) // stride + 1
  wo = (xp.shape[2] - k) // stride + 1
  return sum(np.einsum('nhwc,cd->nhwd', xp[:, i:i + stride * (ho - 1) + 1:stride,
                                          j:j + stride * (wo - 1) + 1:stride],
                       np.asarray(kernel[i, j], np.float64))
             for i in range(k) for j in range(k))


@pytest.mark.parametrize('k,stride,padding,shape', [(3, 1, 1, (2, 7, 5, 6)), (3, 2, 1, (2, 9, 6, 4)),
                                                    (3, 1, 0, (1, 6, 9, 4)), (5, 2, 2, (3, 7, 8, 2))])
def test_im2col_conv_equals_xla_and_numpy(k, stride, padding, shape):
  """Values and both gradients exactly equal XLA's convolution on integer data; the forward
  equals a numpy loop, and the gradients are XLA's (the reference autodiff of that loop)."""
  rng = np.random.default_rng(k + stride + shape[0])
  x, kernel = small_ints(rng, shape, -2, 3), small_ints(rng, (k, k, shape[-1], 5), -2, 3)
  reference = lambda x, kernel: layers.conv(x, kernel, stride, padding)
  g = small_ints(rng, jax.eval_shape(reference, x, kernel).shape, -3, 4)
  y_ref, vjp_ref = jax.vjp(reference, x, kernel)
  y_new, vjp_new = jax.vjp(lambda x, kernel: layers.conv_im2col(x, kernel, stride, padding),
                           x, kernel)
  np.testing.assert_array_equal(y_new, numpy_conv(x, kernel, stride, padding))
  np.testing.assert_array_equal(y_new, y_ref)
  for new, ref in zip(vjp_new(g), vjp_ref(g)):
    np.testing.assert_array_equal(new, ref)
  np.testing.assert_array_equal(vjp_new(g)[1], numpy_kernel_grad(x, g, k, padding)
                                if stride == 1 else vjp_ref(g)[1])


def test_shared_conv_takes_im2col_on_small_maps_with_many_channels(monkeypatch):
  """SharedConv uses im2col on CPU for up to MAX_IM2COL_ROWS output rows from
  MIN_IM2COL_CHANNELS input channels (stride 1 or 2); otherwise XLA's convolution or the tap
  kernel gradient. The layer's value and gradients are the same either way."""
  x, grads = shared_conv_case(seed=4)
  calls = []
  original = layers.conv_im2col
  monkeypatch.setattr(layers, 'conv_im2col', lambda *a: calls.append(a[2:]) or original(*a))
  y_xla, grads_xla = grads()
  assert not calls  # 4 input channels: XLA's convolution
  monkeypatch.setattr(layers, 'MIN_IM2COL_CHANNELS', 4)
  y_new, grads_new = grads()
  assert calls == [(1, 1)]
  np.testing.assert_array_equal(y_new, y_xla)
  jax.tree.map(np.testing.assert_array_equal, grads_new, grads_xla)
  calls.clear()
  layers.SharedConv(6, 3, 2, 1).init(jax.random.key(0), x)
  assert calls == [(2, 1)]
  calls.clear()
  monkeypatch.setattr(layers, 'MAX_IM2COL_ROWS', 119)  # one row fewer than the layer has
  grads()
  assert not calls
  layers.SharedConv(6, 1).init(jax.random.key(0), x)  # 1x1: a matmul already
  assert not calls
