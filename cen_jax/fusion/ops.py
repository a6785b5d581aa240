"""Parameter-free fusion operators on branch-stacked tensors.

Every function here is pure (no module state) and works on arrays whose leading axis is the
branch (modality) axis: activations `x: [M, N, H, W, C]` (NHWC) and per-branch norm scales
`scales: [M, C]`. They are safe under jit, vmap, grad and pmap.

- CEN (docs/papers.md §1.1(b, c)): `exchange`, `sparsity_masks`, `l1_penalty`.
- AsymFusion (docs/papers.md §3.2): `channel_shuffle`, `pixel_shift`.
- TokenFusion (yikaiw/TokenFusion): `token_exchange` on token scores `[M, N, H, W]`, `mask_l1`.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def mean_of_others(x: jax.Array) -> jax.Array:
  """out[m] = mean over m' != m of x[m'], along the leading (branch) axis.

  Written as explicit sums rather than (sum - x[m]) / (M - 1): for M = 2 this is exactly
  x[::-1] (the official swap), with no floating-point cancellation.
  """
  num = x.shape[0]
  if num < 2:
    raise ValueError(f'mean_of_others needs at least 2 branches, got {num}')
  outs = []
  for m in range(num):
    others = [x[k] for k in range(num) if k != m]
    total = others[0]
    for o in others[1:]:
      total = total + o
    outs.append(total if num == 2 else total / (num - 1))
  return jnp.stack(outs)


def exchange(x: jax.Array, scales: jax.Array, threshold: float) -> jax.Array:
  """CEN channel exchange.

  Channel c of branch m keeps its own value where |scales[m, c]| >= threshold; otherwise it
  takes the mean over the other M - 1 branches of their (post-norm) values at channel c.
  For M = 2 this is the official swap; for M > 2 it is the NeurIPS paper's Eq. 6.

  The keep-mask is not differentiated, and a replaced channel passes no gradient back to
  its own branch (`jnp.where` routes the cotangent only to the selected operand).

  Args:
    x: [M, ..., C] branch-stacked activations (output of the private norm).
    scales: [M, C] the private norm's scale (gamma) of each branch.
    threshold: exchange threshold theta.
  Returns:
    [M, ..., C] fused activations, same dtype as x.
  """
  num = x.shape[0]
  if scales.shape != (num, x.shape[-1]):
    raise ValueError(f'exchange: scales shape {scales.shape} does not match x {x.shape}; '
                     f'expected {(num, x.shape[-1])}')
  if num == 1:
    return x
  keep = jax.lax.stop_gradient(jnp.abs(scales) >= threshold)
  keep = keep.reshape((num,) + (1,) * (x.ndim - 2) + (x.shape[-1],))
  return jnp.where(keep, x, mean_of_others(x).astype(x.dtype))


def partition_bounds(num_channels: int, num_branches: int) -> list[tuple[int, int]]:
  """The channel range [start, stop) of each branch that the L1 penalty covers.

  Branch m gets [m * C // M, (m + 1) * C // M): M contiguous near-equal parts. For M = 2 this
  is the official split (branch 0: [:C // 2], branch 1: [C // 2:]). The official code has
  no M > 2 partition; contiguous parts keep exchanged channels in disjoint index ranges.
  """
  return [(m * num_channels // num_branches, (m + 1) * num_channels // num_branches)
          for m in range(num_branches)]


def sparsity_masks(num_branches: int, num_channels: int) -> np.ndarray:
  """Boolean [M, C]: True where the L1 penalty applies to branch m's channel c."""
  mask = np.zeros((num_branches, num_channels), bool)
  for m, (start, stop) in enumerate(partition_bounds(num_channels, num_branches)):
    mask[m, start:stop] = True
  return mask


def l1_penalty(scales_list: Sequence[jax.Array]) -> jax.Array:
  """Sum of |scale| over the partitioned channels of every exchanging norm.

  Args:
    scales_list: [M, C_l] scales of each exchanging norm layer l.
  """
  total = jnp.zeros((), jnp.float32)
  for scales in scales_list:
    mask = sparsity_masks(*scales.shape)
    total = total + jnp.sum(jnp.where(mask, jnp.abs(scales.astype(jnp.float32)), 0.0))
  return total


def fraction_below_threshold(scales_list: Sequence[jax.Array], threshold: float) -> jax.Array:
  """Per branch: the fraction of its penalised scales with |scale| < threshold. [M]."""
  below = 0.0
  count = 0.0
  for scales in scales_list:
    mask = sparsity_masks(*scales.shape)
    below = below + jnp.sum(jnp.where(mask, jnp.abs(scales) < threshold, False), axis=1)
    count = count + mask.sum(axis=1)
  return below / np.maximum(count, 1)


def late_ensemble(outputs: jax.Array, alpha: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The learned late ensemble of CEN (docs/papers.md §1.1(e)): sum_m softmax(alpha)_m *
  stop_gradient(outputs[m]). The branch outputs are detached, so alpha learns only from the
  ensemble's loss. Returns (ensemble [N, ...], softmax weights [M])."""
  weights = jax.nn.softmax(alpha)
  detached = jax.lax.stop_gradient(outputs)
  ensemble = weights[0] * detached[0]
  for m in range(1, outputs.shape[0]):
    ensemble = ensemble + weights[m] * detached[m]
  return ensemble, weights


# ----------------------------------------------------------------------------- AsymFusion

# (dy, dx) per shift group, the official order: out[i, j] = x[i + dy, j + dx], zero outside.
SHIFT_DIRECTIONS = ((-1, 0), (0, -1), (0, 1), (1, 0))


def shift_split(num_channels: int) -> tuple[int, int]:
  """(g, S): g = C // 5 channels per shift group, S = 4g shifted; C - S channels are swapped."""
  group = num_channels // 5
  return group, 4 * group


def channel_shuffle(x: jax.Array) -> jax.Array:
  """AsymFusion channel shuffle on 2 branches [2, ..., C].

  Each branch keeps its first S = 4 * (C // 5) channels and takes the remaining C - S from the
  other branch. A single branch passes through unchanged (the official op is the identity
  unless exactly two branches are given).
  """
  if x.shape[0] == 1:
    return x
  if x.shape[0] != 2:
    raise ValueError(f'channel_shuffle is defined for 2 branches, got {x.shape[0]}')
  _, split = shift_split(x.shape[-1])
  return jnp.concatenate([x[..., :split], x[::-1, ..., split:]], axis=-1)


def shift_pixels(x: jax.Array, dy: int, dx: int) -> jax.Array:
  """out[..., i, j, :] = x[..., i + dy, j + dx, :], zero where that falls outside. x: [..., H, W, C]."""
  height, width = x.shape[-3], x.shape[-2]
  pad = [(0, 0)] * (x.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
  padded = jnp.pad(x, pad)
  return padded[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width, :]


def pixel_shift(x: jax.Array) -> jax.Array:
  """AsymFusion pixel shift on [M, N, H, W, C] (per branch, no mixing).

  Group k (channels [k*g, (k+1)*g)) is shifted by one pixel along SHIFT_DIRECTIONS[k] with zero
  padding; channels [S, C) are zero. The caller adds branch m's shift to the other branch.
  """
  group, split = shift_split(x.shape[-1])
  parts = [shift_pixels(x[..., k * group:(k + 1) * group], dy, dx)
           for k, (dy, dx) in enumerate(SHIFT_DIRECTIONS)]
  parts.append(jnp.zeros(x.shape[:-1] + (x.shape[-1] - split,), x.dtype))
  return jnp.concatenate(parts, axis=-1)


# ----------------------------------------------------------------------------- TokenFusion

def token_exchange(x: jax.Array, scores: jax.Array, threshold: float) -> jax.Array:
  """TokenFusion's exchange: token (n, h, w) of branch m keeps its value where
  scores[m, n, h, w] >= threshold and otherwise takes the other branch's (M = 2: the official
  swap; M > 2: the mean of the other branches, as CEN's exchange generalises).

  x: [M, N, H, W, C]; scores: [M, N, H, W]. The comparison passes no gradient; a replaced token
  passes its gradient to the branch it came from (`jnp.where`), as the official masked copy.
  """
  keep = jax.lax.stop_gradient(scores >= threshold)[..., None]
  return jnp.where(keep, x, mean_of_others(x).astype(x.dtype))


def mask_l1(masks: Sequence[jax.Array]) -> jax.Array:
  """The official score penalty: sum over blocks and branches of sum |score| (not a mean);
  the loss adds lamda (1e-4) times it."""
  total = jnp.zeros((), jnp.float32)
  for mask in masks:
    total = total + jnp.sum(jnp.abs(mask.astype(jnp.float32)))
  return total


def fraction_of_tokens_below(masks: Sequence[jax.Array], threshold: float) -> jax.Array:
  """Per branch: the fraction of token scores under `threshold`, averaged over the blocks
  (what the official training prints each epoch). [M]."""
  fractions = [jnp.mean((mask < threshold).reshape(mask.shape[0], -1), axis=1) for mask in masks]
  return sum(fractions) / max(len(fractions), 1)
