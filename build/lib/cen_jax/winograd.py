"""The kernel gradient of a 3x3 stride-1 convolution by Winograd's minimal filtering, F(2x2, 3x3)
(Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).

The forward convolution in this form is y_tile = A^T [(G k G^T) * (B^T d B)] A for each 2x2
output tile y_tile and its 4x4 input window d. Its kernel gradient is therefore
dK = G^T dU G, dU[xi, nu] = sum over tiles of (B^T d B)[xi, nu]^T (A g_tile A^T)[xi, nu]:
16 matmuls over the tiles, [C_out, T] x [T, C_in], instead of the nine [C_out, N H W] x
[N H W, C_in] of the per-tap form, 2.25x fewer multiplications. All the transform
coefficients are 0, +-1 or +-1/2, so the values differ from a direct sum only by rounding order
(about 1e-6 of the largest entry in float32), and on small integers they are exact.

XLA:CPU specifics (benchmarks/conv_grad.py): the 16 transformed pieces stay separate arrays
(stacking them is a concatenate, several times slower than the elementwise fusions that make
them), and the cotangent pieces are transposed to channels-first after they are made, behind an
optimization barrier (fused into the transpose, the strided reads ran 5x slower).
"""

import jax
import jax.numpy as jnp
import numpy as np

# B^T (4x4), G (4x3) and A (4x2; A^T is the output transform) of F(2x2, 3x3).
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
A = np.array([[1, 0], [1, 1], [1, -1], [0, -1]])


def _signed_sum(coefs, pieces):
  """sum_i coefs[i] pieces[i] for coefficients in {-1, 0, 1}, as additions and negations."""
  total = None
  for coef, piece in zip(coefs, pieces):
    if coef:
      term = piece if coef > 0 else -piece
      total = term if total is None else total + term
  return total


def input_transform(padded: jax.Array, tiles_h: int, tiles_w: int) -> list:
  """16 arrays [N T_h T_w, C], (xi, nu) in row-major order: B^T d B over the 4x4 windows d at
  stride 2 of a padded map (rows 0 .. 2 T_h + 1 and columns 0 .. 2 T_w + 1 of it are read).
  Each is one fusion of four strided slices (the separable form, 4 + 4 passes, was slower)."""
  c = padded.shape[-1]
  windows = [[padded[:, i:i + 2 * tiles_h:2, j:j + 2 * tiles_w:2, :] for j in range(4)]
             for i in range(4)]
  return [_signed_sum([B_T[xi, i] * B_T[nu, j] for i in range(4) for j in range(4)],
                      [windows[i][j] for i in range(4) for j in range(4)]).reshape(-1, c)
          for xi in range(4) for nu in range(4)]


def cotangent_transform(g: jax.Array) -> list:
  """16 arrays [C, N H/2 W/2], (xi, nu) in row-major order: A g_tile A^T over the 2x2 tiles of
  g ([N, H, W, C], H and W even), channels first (the left operands of the plain matmul).
  Separable: the column transform in channels-last (8 arrays), each transposed once behind a
  barrier, then the row transform on contiguous channels-first arrays (2.5x faster than
  transposing the 16 results)."""
  c = g.shape[-1]
  columns = [[_signed_sum(A[nu], [g[:, i::2, j::2, :] for j in range(2)]) for nu in range(4)]
             for i in range(2)]
  columns = [[jnp.transpose(jax.lax.optimization_barrier(t), (3, 0, 1, 2)).reshape(c, -1)
              for t in row] for row in columns]
  return [_signed_sum(A[xi], [columns[i][nu] for i in range(2)])
          for xi in range(4) for nu in range(4)]


def kernel_grad_3x3(x: jax.Array, g: jax.Array, padding: int) -> jax.Array:
  """The kernel gradient [3, 3, C_in, C_out] of `layers.conv(x, kernel, 1, padding)` (x
  [N, H, W, C_in]) for the output cotangent g [N, H_out, W_out, C_out]."""
  _, h_out, w_out, _ = g.shape
  extra_h, extra_w = h_out % 2, w_out % 2  # odd outputs: one zero row/column of cotangent
  g = jnp.pad(g, ((0, 0), (0, extra_h), (0, extra_w), (0, 0)))
  padded = jnp.pad(x, ((0, 0), (padding, padding + extra_h), (padding, padding + extra_w), (0, 0)))
  v = input_transform(padded, g.shape[1] // 2, g.shape[2] // 2)
  dm = cotangent_transform(g)
  du = jnp.stack([dm_k @ v_k for dm_k, v_k in zip(dm, v)])  # [16, C_out, C_in]
  du = du.reshape(4, 4, *du.shape[1:])
  return jnp.einsum('xa,yb,xyoc->abco', G, G, du)
