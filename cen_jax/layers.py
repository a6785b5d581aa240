"""Layers for branch-stacked tensors `[M, N, H, W, C]`.

- `SharedConv`: one kernel for all M branches, applied as one XLA op (M folded into the batch).
- `PrivateBatchNorm` / `PrivateInstanceNorm`: a single-branch norm with PyTorch semantics,
  `nn.vmap`-ed over the branch axis so that parameters and statistics are stacked `[M, C]`.
- `max_pool`, `resize`: PyTorch-exact pooling and interpolation (explicit paddings,
  align_corners, cv2-style bicubic), written as plain functions.
- `remat`: a block class recomputed in the backward pass (config.model.remat).
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from cen_jax import winograd

Dtype = Any


def torch_conv_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch's default Conv2d init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')(key, shape, dtype)


def torch_conv_bias_init(fan_in: int):
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# What a rematerialised block keeps for the backward pass (config.model.remat):
# - 'none': everything XLA keeps (no remat);
# - 'blocks': only the block's input; the whole block runs again in the backward pass;
# - 'keep_convs': the outputs of its shared convolutions (and matmuls), so that only the norms,
#   activations and fusions run again: everything but the convolutions, most of the FLOPs.
CONV_OUTPUT = 'shared_conv_output'  # the checkpoint_name of SharedConv's output
REMAT_POLICIES = {
    'none': None,
    'blocks': jax.checkpoint_policies.nothing_saveable,
    'keep_convs': jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT),
        jax.checkpoint_policies.dots_saveable),
}


def remat(module_class, policy: str):
  """`module_class`, or its rematerialised version under one of REMAT_POLICIES (the module's
  parameter and statistics paths are unchanged: checkpoints are the same)."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f'config.model.remat={policy!r}: expected one of '
                     f'{", ".join(REMAT_POLICIES)}')
  if policy == 'none':
    return module_class
  return nn.remat(module_class, policy=REMAT_POLICIES[policy])


def fold(x: jax.Array) -> jax.Array:
  """[M, N, ...] -> [M * N, ...]: lets one op serve every branch."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def unfold(y: jax.Array, num_branches: int) -> jax.Array:
  return y.reshape((num_branches, y.shape[0] // num_branches) + y.shape[1:])


class SharedConv(nn.Module):
  """A 2-D convolution shared by all branches, with PyTorch's explicit symmetric padding.

  Parameters are `kernel: [k, k, C_in, C_out]` (HWIO) and optionally `bias: [C_out]`.
  The convolution runs as `fastest_conv`.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Callable = torch_conv_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    k = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (k, k, in_features, self.features))
    kernel = kernel.astype(self.dtype)
    y = fastest_conv(fold(x).astype(self.dtype), kernel, self.stride, self.padding)
    if self.use_bias:
      bias = self.param('bias', torch_conv_bias_init(k * k * in_features), (self.features,))
      y = y + bias.astype(self.dtype)
    return checkpoint_name(unfold(y, x.shape[0]), CONV_OUTPUT)


def fastest_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """`conv`, in the form that is fastest on this backend for its shape (same values): a
  1x1 as a matmul (XLA:CPU runs 1x1 convs far slower than the identical dot; docs/benchmarks.md;
  a stride becomes a strided slice first), and on CPU im2col on small maps with many channels
  and a kernel gradient by matmuls on larger ones."""
  k, in_features = kernel.shape[0], kernel.shape[2]
  if k == 1 and padding == 0:
    if stride > 1:
      x = x[:, ::stride, ::stride, :]
    return jnp.einsum('nhwc,cd->nhwd', x, kernel[0, 0])
  if use_im2col(x.shape, k, stride, padding):
    return conv_im2col(x, kernel, stride, padding)
  if stride == 1 and use_matmul_kernel_grad(in_features):
    return conv_matmul_kernel_grad(x, kernel, padding)
  return conv(x, kernel, stride, padding)


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """torch Conv2d (symmetric zero padding, no bias) on [N, H, W, C] with an HWIO kernel."""
  pad = ((padding, padding), (padding, padding))
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


# XLA:CPU computes a convolution's kernel gradient as a convolution whose window is the whole
# feature map, at a fifth to a third of the forward convolution's FLOP rate.
# `conv_matmul_kernel_grad` computes it as matmuls instead, in one of three forms:
# - a 3x3 kernel with C_out > C_in / 2: Winograd's F(2x2, 3x3) (cen_jax/winograd.py), 16
#   matmuls over 2x2 output tiles; at [4, 64, 64, 256] -> 256 1.3-1.4x faster than the
#   per-tap form and 3.6-4.2x faster than XLA's (alone; in the whole step on the 2-core
#   machine its memory-bound transforms cost about what the matmuls save: docs/benchmarks.md);
# - narrow outputs (2 C_out <= C_in, the 256 -> 40 classifier): one matmul over shifted copies
#   of the cotangent;
# - otherwise one matmul per kernel tap.
# It is taken from 128 input channels on (the larger the map, the more it gains); below that
# XLA's own is about as fast (Winograd gains 10 ms at [4, 64, 64, 64] -> 64 and loses on
# 16x16 maps). benchmarks/conv_grad.py measures them all.
MIN_MATMUL_GRAD_CHANNELS = 128
MATMUL_KERNEL_GRAD_FORMS = ('per tap', 'shifted cotangent', 'winograd')


def use_matmul_kernel_grad(in_features: int) -> bool:
  """Whether `fastest_conv` takes `conv_matmul_kernel_grad`."""
  return jax.default_backend() == 'cpu' and in_features >= MIN_MATMUL_GRAD_CHANNELS


def matmul_kernel_grad_form(kernel_shape: tuple) -> str:
  """Which form `conv_matmul_kernel_grad` takes for an HWIO kernel shape: 'winograd' (3x3,
  wide outputs), 'shifted cotangent' (2 C_out <= C_in) or 'per tap'."""
  kh, kw, cin, cout = kernel_shape
  if 2 * cout <= cin:
    return 'shifted cotangent'
  return 'winograd' if kh == kw == 3 else 'per tap'


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_matmul_kernel_grad(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
  """`conv(x, kernel, 1, padding)` whose kernel gradient is computed by matmuls (above). The
  input gradient is XLA's own."""
  return conv(x, kernel, 1, padding)


def _conv_matmul_fwd(x, kernel, padding):
  return conv(x, kernel, 1, padding), (x, kernel)


def _conv_matmul_bwd(padding, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: conv(x, kernel, 1, padding), x)
  (dx,) = input_vjp(g)
  kh, kw = kernel.shape[:2]
  # The barrier ties the copies of x to g: without it XLA's scheduler makes them right after
  # the forward pass and keeps every layer's alive until its backward (GiBs).
  x, g = jax.lax.optimization_barrier((x, g))
  return dx, matmul_kernel_grad(x, g, (kh, kw), padding).astype(kernel.dtype)


def matmul_kernel_grad(x, g, kernel_hw, padding, form=None):
  """The kernel gradient [kh, kw, C_in, C_out] of `conv(x, kernel, 1, padding)` for the output
  cotangent g, in `form` (default: the one `matmul_kernel_grad_form` picks for the shape)."""
  kh, kw = kernel_hw
  form = form or matmul_kernel_grad_form((kh, kw, x.shape[-1], g.shape[-1]))
  if form == 'winograd':
    return winograd.kernel_grad_3x3(x, g, padding)
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  if form == 'shifted cotangent':  # narrow outputs (the classifiers): shift g, not x
    return _shifted_cotangent_kernel_grad(padded, g, kh, kw)
  if form == 'per tap':
    return per_tap_kernel_grad(padded, g, kh, kw)
  names = ', '.join(map(repr, MATMUL_KERNEL_GRAD_FORMS))
  raise ValueError(f'form={form!r}: expected one of {names}')


def per_tap_kernel_grad(padded, g, kh, kw):
  """dK[i, j] = (g^T x_ij)^T, x_ij the window of the padded x at offset (i, j): nine plain
  matmuls over g transposed once (`channels_first`). [kh, kw, C_in, C_out]."""
  _, h, w, cout = g.shape
  cin = padded.shape[-1]
  g_t = channels_first(g)
  taps = [g_t @ padded[:, i:i + h, j:j + w, :].reshape(-1, cin)
          for i in range(kh) for j in range(kw)]
  return jnp.stack(taps).reshape(kh, kw, cout, cin).transpose(0, 1, 3, 2)


def channels_first(a: jax.Array) -> jax.Array:
  """[N, H, W, C] -> [C, N H W], transposed in memory. A matmul that sums over the pixels of
  two channels-last maps has its left operand transposed, and XLA:CPU runs that form (Eigen)
  at about 140 GFLOP/s against 220 for the plain [M, K] x [K, N] form (a YNNPACK fusion);
  transposing one operand once is cheaper. The 4-d transpose before the reshape keeps XLA
  from folding it back into the dot."""
  return jnp.transpose(a, (3, 0, 1, 2)).reshape(a.shape[-1], -1)


def _shifted_cotangent_kernel_grad(padded, g, kh, kw):
  """dK[i, j] = sum over the padded map of x_padded^T G_ij, G_ij being g placed at offset
  (i, j) in a zero map of the padded size: the copies are of g (C_out channels) instead of x,
  and the nine taps are one [C_in, L] x [L, kh kw C_out] matmul. (Here transposing the shifted
  copies for the plain form, as the nine-matmul form does with g, was 3-10% slower.)"""
  _, h, w, cout = g.shape
  hp, wp, cin = padded.shape[1:]
  shifted = jnp.concatenate([jnp.pad(g, ((0, 0), (i, hp - h - i), (j, wp - w - j), (0, 0)))
                             for i in range(kh) for j in range(kw)], axis=-1)
  dk = jax.lax.dot_general(padded.reshape(-1, cin), shifted.reshape(-1, kh * kw * cout),
                           (((0,), (0,)), ((), ())))
  return dk.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)


conv_matmul_kernel_grad.defvjp(_conv_matmul_fwd, _conv_matmul_bwd)


# On small maps XLA:CPU's convolutions are slow: at [4, 8, 8, 512] -> 512 its forward takes 10
# ms and its input gradient 12 ms, against 5 and 4 ms for one matmul over the k x k shifted
# copies of x (im2col) and its transpose; torch's conv2d takes 4.6 ms. Up to about 1,024 output
# rows (N H_out W_out) with at least 128 input channels im2col is faster; on larger maps XLA's
# own (and the matmul kernel gradient above) is. benchmarks/conv_grad.py measures both.
MAX_IM2COL_ROWS = 1024
MIN_IM2COL_CHANNELS = 128


def output_size(size: int, k: int, stride: int, padding: int) -> int:
  return (size + 2 * padding - k) // stride + 1


def use_im2col(x_shape: tuple, k: int, stride: int, padding: int) -> bool:
  n, h, w, cin = x_shape
  rows = n * output_size(h, k, stride, padding) * output_size(w, k, stride, padding)
  return (jax.default_backend() == 'cpu' and k > 1 and cin >= MIN_IM2COL_CHANNELS
          and rows <= MAX_IM2COL_ROWS)


def im2col(x: jax.Array, k: int, stride: int, padding: int) -> jax.Array:
  """[N, H, W, C] -> [N, H_out, W_out, k k C]: the k x k windows, taps in HWI kernel order."""
  _, h, w, _ = x.shape
  ho, wo = output_size(h, k, stride, padding), output_size(w, k, stride, padding)
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  return jnp.concatenate(
      [padded[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
       for i in range(k) for j in range(k)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_im2col(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """`conv(x, kernel, stride, padding)` as one matmul over `im2col(x)`; the backward pass
  rebuilds the windows from x (only x is kept) and takes both gradients as matmuls."""
  return _im2col_matmul(x, kernel, stride, padding)


def _im2col_matmul(x, kernel, stride, padding):
  kh, _, cin, cout = kernel.shape
  return im2col(x, kh, stride, padding) @ kernel.reshape(kh * kh * cin, cout)


def _conv_im2col_fwd(x, kernel, stride, padding):
  return _im2col_matmul(x, kernel, stride, padding), (x, kernel)


def _conv_im2col_bwd(stride, padding, residuals, g):
  x, kernel = residuals
  kh, _, cin, cout = kernel.shape
  x, g = jax.lax.optimization_barrier((x, g))  # as in _conv_matmul_bwd: windows made when needed
  cols, cols_vjp = jax.vjp(lambda x: im2col(x, kh, stride, padding), x)
  flat_g = g.reshape(-1, cout)
  dk = cols.reshape(-1, kh * kh * cin).T @ flat_g
  (dx,) = cols_vjp((flat_g @ kernel.reshape(-1, cout).T).reshape(cols.shape))
  return dx, dk.reshape(kernel.shape)


conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


class BatchNorm(nn.Module):
  """Single-branch BatchNorm with PyTorch semantics on [N, H, W, C].

  Differs from `flax.linen.BatchNorm` where parity matters: `momentum` is PyTorch's (weight of
  the new batch), the running variance is updated with the unbiased batch variance, and the
  variance is computed in two passes. Statistics are synchronised across devices over
  `axis_name` (SyncBN). Normalisation runs in float32; the output has `dtype`.
  """
  use_running_average: bool
  momentum: float = 0.1
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      count = np.prod([x.shape[a] for a in axes])
      mean = jnp.mean(xf, axes)
      if self.axis_name is not None:
        mean = jax.lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if self.axis_name is not None:
        var = jax.lax.pmean(var, self.axis_name)
        count = count * jax.lax.psum(1, self.axis_name)
      if not self.is_initializing():
        unbiased = var * count / jnp.maximum(count - 1, 1)
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    inv = scale * jax.lax.rsqrt(var + self.epsilon)
    return ((xf - mean) * inv + bias).astype(self.dtype)


class InstanceNorm(nn.Module):
  """Single-branch affine InstanceNorm on [N, H, W, C], PyTorch semantics.

  With `track_running_stats`, training updates running statistics with the batch mean of the
  per-instance means and unbiased variances (as torch.nn.InstanceNorm2d does), and
  `use_running_average=True` normalises with them.
  """
  use_running_average: bool = False
  track_running_stats: bool = True
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  # Statistics of the global batch: the running update averages the per-instance statistics
  # over every device of `axis_name` (equal per-device batches), so data parallel = one device.
  axis_name: Optional[str] = None
  # False: normalise with instance statistics but leave the running statistics as they are.
  update_stats: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,))
    bias = self.param('bias', nn.initializers.zeros, (features,))
    xf = x.astype(jnp.float32)
    spatial = tuple(range(1, x.ndim - 1))
    if self.track_running_stats:
      ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
      ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    if self.track_running_stats and self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean = jnp.mean(xf, spatial, keepdims=True)
      var = jnp.mean(jnp.square(xf - mean), spatial, keepdims=True)
      if self.track_running_stats and self.update_stats and not self.is_initializing():
        count = np.prod([x.shape[a] for a in spatial])
        unbiased = var * count / max(count - 1, 1)
        batch_mean = jnp.mean(mean.reshape(x.shape[0], features), 0)
        batch_var = jnp.mean(unbiased.reshape(x.shape[0], features), 0)
        if self.axis_name is not None:
          batch_mean = jax.lax.pmean(batch_mean, self.axis_name)
          batch_var = jax.lax.pmean(batch_var, self.axis_name)
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * batch_mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * batch_var
    inv = scale * jax.lax.rsqrt(var + self.epsilon)
    return ((xf - mean) * inv + bias).astype(self.dtype)


def per_branch(module_cls):
  """Stack a single-branch module's parameters and statistics along a leading branch axis."""
  return nn.vmap(module_cls, in_axes=0, out_axes=0,
                 variable_axes={'params': 0, 'batch_stats': 0},
                 split_rngs={'params': True})


# Private (per-branch) norms: parameters and statistics [M, C]; input/output [M, N, H, W, C].
PrivateBatchNorm = per_branch(BatchNorm)
PrivateInstanceNorm = per_branch(InstanceNorm)


# Below this size XLA's own pool is kept: the separable form costs compile time (more ops),
# which small models (the demo, the tests) would not win back. From 2^17 elements the gradient
# alone wins it back: at [4, 8, 8, 512] (the level-4 CRP pools at 256x256) forward + backward
# take 8.3 ms with XLA's select-and-scatter against 1.3 ms separable.
MIN_CPU_POOL_ELEMENTS = 2 ** 17


def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
  """torch MaxPool2d(window, stride, padding) on [M, N, H, W, C] (pads with -inf).

  The gradient goes to the first maximal element of each window in row-major order (torch's
  and XLA's select-and-scatter rule). On CPU a stride-1 pool is computed as two separable
  1-D pools (`separable_max_pool`): XLA:CPU's select-and-scatter gradient is ~3x slower than
  torch's (docs/benchmarks.md), while the separable gradient is a few elementwise selects.
  """
  if stride == 1 and jax.default_backend() == 'cpu' and x.size >= MIN_CPU_POOL_ELEMENTS:
    y = separable_max_pool(fold(x), window, padding)
  else:
    pad = ((padding, padding), (padding, padding))
    y = nn.max_pool(fold(x), (window, window), (stride, stride), pad)
  return unfold(y, x.shape[0])


def separable_max_pool(x: jax.Array, window: int, padding: int) -> jax.Array:
  """Stride-1 `window` x `window` max-pool of [N, H, W, C], -inf padded: a 1-D pool along W,
  then along H. With first-maximum gradients in both, the gradient of the 2-D pool reaches
  the first maximal element in row-major order: the first row whose maximum is the window's,
  and in it the first maximal column, as reduce_window's gradient does."""
  return max_pool_1d(max_pool_1d(x, 2, window, padding), 1, window, padding)


def _shifted_windows(x: jax.Array, axis: int, window: int, padding: int) -> list:
  """The `window` slices s_d[i] = x_padded[i + d] (d = 0 .. window - 1) along `axis`, x padded
  with -inf: the stride-1 1-D pool is their elementwise maximum."""
  pads = [(0, 0)] * x.ndim
  pads[axis] = (padding, padding)
  padded = jnp.pad(x, pads, constant_values=-jnp.inf)
  size = output_size(x.shape[axis], window, 1, padding)
  return [jax.lax.slice_in_dim(padded, d, d + size, axis=axis) for d in range(window)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_1d(x: jax.Array, axis: int, window: int, padding: int) -> jax.Array:
  """Stride-1 1-D max-pool along `axis` (-inf padding); the gradient of each output goes to
  the first maximal element of its window (no splitting between ties, unlike jnp.maximum's)."""
  return functools.reduce(jnp.maximum, _shifted_windows(x, axis, window, padding))


def _max_pool_1d_fwd(x, axis, window, padding):
  y = max_pool_1d(x, axis, window, padding)
  return y, (x, y)


def _max_pool_1d_bwd(axis, window, padding, residuals, g):
  x, y = residuals
  taken = jnp.zeros(y.shape, bool)
  grad_padded = 0.0
  for d, shifted in enumerate(_shifted_windows(x, axis, window, padding)):
    first = (shifted == y) & ~taken  # offset d holds the maximum and no earlier offset did
    taken = taken | first
    pads = [(0, 0)] * y.ndim
    pads[axis] = (d, window - 1 - d)  # output i came from padded input i + d
    grad_padded = grad_padded + jnp.pad(jnp.where(first, g, jnp.zeros_like(g)), pads)
  return (jax.lax.slice_in_dim(grad_padded, padding, padding + x.shape[axis], axis=axis),)


max_pool_1d.defvjp(_max_pool_1d_fwd, _max_pool_1d_bwd)


@functools.lru_cache(maxsize=None)
def interpolation_matrix(size_in: int, size_out: int, method: str) -> np.ndarray:
  """[size_out, size_in] matrix A with out = A @ in along one axis.

  method:
    'bilinear_align_corners': torch bilinear, align_corners=True.
    'bilinear': torch bilinear, align_corners=False (half-pixel, negative source clamped to 0).
    'bicubic': cv2.INTER_CUBIC (half-pixel, a = -0.75, replicated border).
  """
  out = np.arange(size_out, dtype=np.float64)
  mat = np.zeros((size_out, size_in), np.float64)
  rows = np.arange(size_out)
  if method == 'bilinear_align_corners':
    src = out * ((size_in - 1) / (size_out - 1)) if size_out > 1 else np.zeros_like(out)
  elif method in ('bilinear', 'bicubic'):
    src = (out + 0.5) * (size_in / size_out) - 0.5
  else:
    raise ValueError(f'unknown interpolation method {method!r}')
  if method == 'bicubic':
    base = np.floor(src)
    t = src - base
    a = -0.75
    weights = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
               ((a + 2) * t - (a + 3)) * t * t + 1,
               ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1]
    weights.append(1.0 - weights[0] - weights[1] - weights[2])
    for k, w in enumerate(weights):
      idx = np.clip(base.astype(np.int64) - 1 + k, 0, size_in - 1)
      np.add.at(mat, (rows, idx), w)
    return mat.astype(np.float32)
  src = np.maximum(src, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = src - lo
  np.add.at(mat, (rows, lo), 1.0 - frac)
  np.add.at(mat, (rows, hi), frac)
  return mat.astype(np.float32)


def resize(x: jax.Array, size: tuple[int, int], method: str) -> jax.Array:
  """Resize [..., H, W, C] to [..., size[0], size[1], C] with separable interpolation matrices.

  Exact PyTorch/cv2 semantics (see `interpolation_matrix`), differentiable, and a matmul on
  accelerators. Computed at HIGHEST precision so TF32 does not blur parity.
  """
  height, width = x.shape[-3], x.shape[-2]
  if (height, width) == tuple(size):
    return x
  mat_h = jnp.asarray(interpolation_matrix(height, size[0], method), x.dtype)
  mat_w = jnp.asarray(interpolation_matrix(width, size[1], method), x.dtype)
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum('oh,...hwc->...owc', mat_h, x, precision=hi)
  return jnp.einsum('pw,...owc->...opc', mat_w, y, precision=hi)


def torch_conv_transpose_kernel_init(key, shape, dtype=jnp.float32):
  """PyTorch's default ConvTranspose2d init on our [k, k, C_in, C_out] kernel.

  torch stores the weight as [C_in, C_out, k, k] and takes fan_in from dim 1, i.e.
  C_out * k * k (not C_in * k * k): U(+-1/sqrt(C_out * k * k)).
  """
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform', in_axis=-1,
                                          out_axis=-2)(key, shape, dtype)


class SharedConvTranspose(nn.Module):
  """torch ConvTranspose2d(C_in, features, k, stride, padding) shared by all branches.

  Output size (H - 1) * stride - 2 * padding + k (2H for the pix2pix k=4, s=2, p=1).
  Parameters: `kernel: [k, k, C_in, C_out]` = torch weight [C_in, C_out, k, k] transposed
  (2, 3, 0, 1), and `bias: [C_out]` (torch default init: fan_in = C_out * k * k, see above).
  Computed as the equivalent stride-1 convolution of the stride-dilated input with the
  spatially flipped kernel.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Callable = torch_conv_transpose_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    k = self.kernel_size
    if self.padding > k - 1:
      raise ValueError(f'SharedConvTranspose: padding {self.padding} > kernel_size - 1 = {k - 1}')
    kernel = self.param('kernel', self.kernel_init, (k, k, in_features, self.features))
    flipped = kernel[::-1, ::-1].astype(self.dtype)
    edge = k - 1 - self.padding
    y = jax.lax.conv_general_dilated(fold(x).astype(self.dtype), flipped, (1, 1),
                                     ((edge, edge), (edge, edge)),
                                     lhs_dilation=(self.stride, self.stride),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = self.param('bias', torch_conv_bias_init(k * k * self.features), (self.features,))
      y = y + bias.astype(self.dtype)
    return unfold(y, x.shape[0])
