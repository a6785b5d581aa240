"""Property-based tests (hypothesis) of the pure fusion ops: exchange, the sparsity partition,
channel shuffle and pixel shift, on arbitrary branch counts, shapes and thresholds."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cen_jax.fusion import ops

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def branches(draw, min_branches=1, max_branches=5):
  """(x [M, N, H, W, C], scales [M, C], threshold)."""
  m = draw(st.integers(min_branches, max_branches))
  n, h, w, c = (draw(st.integers(1, k)) for k in (2, 4, 4, 9))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  x = rng.standard_normal((m, n, h, w, c)).astype(np.float32)
  scales = rng.uniform(-1.0, 1.0, (m, c)).astype(np.float32)
  threshold = draw(st.floats(0.0, 1.0))
  return x, scales, threshold


@SETTINGS
@given(branches())
def test_exchange_keeps_strong_channels_and_replaces_weak_ones_by_the_mean_of_the_others(case):
  x, scales, threshold = case
  out = np.asarray(ops.exchange(x, scales, threshold))
  m = x.shape[0]
  for b in range(m):
    others = [k for k in range(m) if k != b]
    for c in range(x.shape[-1]):
      if m == 1 or abs(scales[b, c]) >= threshold:
        np.testing.assert_array_equal(out[b, ..., c], x[b, ..., c])
      else:
        np.testing.assert_allclose(out[b, ..., c], np.mean(x[others, ..., c], axis=0),
                                   rtol=1e-6, atol=1e-6)


@SETTINGS
@given(branches(min_branches=2), st.data())
def test_exchange_is_permutation_equivariant(case, data):
  x, scales, threshold = case
  perm = np.asarray(data.draw(st.permutations(range(x.shape[0]))))
  out = np.asarray(ops.exchange(x, scales, threshold))
  permuted = np.asarray(ops.exchange(x[perm], scales[perm], threshold))
  np.testing.assert_allclose(permuted, out[perm], rtol=1e-6, atol=1e-6)


@SETTINGS
@given(branches(min_branches=2, max_branches=2))
def test_exchange_of_two_branches_is_an_exact_swap(case):
  x, scales, threshold = case
  out = np.asarray(ops.exchange(x, scales, threshold))
  keep = np.abs(scales) >= threshold  # [2, C]
  expected = np.where(keep[:, None, None, None, :], x, x[::-1])
  np.testing.assert_array_equal(out, expected)  # bitwise: no arithmetic for M = 2


@SETTINGS
@given(st.integers(1, 300), st.integers(1, 6))
def test_partition_is_disjoint_covering_and_near_equal(channels, num_branches):
  bounds = ops.partition_bounds(channels, num_branches)
  assert bounds[0][0] == 0 and bounds[-1][1] == channels
  for (_, stop), (start, _) in zip(bounds[:-1], bounds[1:]):
    assert stop == start  # contiguous: disjoint and covering
  sizes = [stop - start for start, stop in bounds]
  assert max(sizes) - min(sizes) <= 1
  masks = ops.sparsity_masks(num_branches, channels)
  np.testing.assert_array_equal(masks.sum(0), np.ones(channels))  # each channel penalised once


@st.composite
def two_branches(draw):
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  shape = (2, draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 5)),
           draw(st.integers(1, 16)))
  return rng.standard_normal(shape).astype(np.float32)


@SETTINGS
@given(two_branches())
def test_channel_shuffle_is_an_involution_keeping_the_shifted_part(x):
  once = np.asarray(ops.channel_shuffle(x))
  np.testing.assert_array_equal(np.asarray(ops.channel_shuffle(once)), x)
  _, split = ops.shift_split(x.shape[-1])
  np.testing.assert_array_equal(once[..., :split], x[..., :split])
  np.testing.assert_array_equal(once[..., split:], x[::-1, ..., split:])


@SETTINGS
@given(two_branches(), st.sampled_from(ops.SHIFT_DIRECTIONS))
def test_pixel_shift_moves_by_one_pixel_with_zero_borders(x, direction):
  dy, dx = direction
  shifted = np.asarray(ops.shift_pixels(x, dy, dx))
  back = np.asarray(ops.shift_pixels(shifted, -dy, -dx))
  h, w = x.shape[-3], x.shape[-2]
  inner = (slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0)))
  # Shifting back restores every pixel that did not fall off the border; the rest is zero.
  np.testing.assert_array_equal(back[..., inner[0], inner[1], :], x[..., inner[0], inner[1], :])
  mask = np.zeros((h, w), bool)
  mask[inner] = True
  assert not back[..., ~mask, :].any()
  group, split = ops.shift_split(x.shape[-1])
  out = np.asarray(ops.pixel_shift(x))
  assert not out[..., split:].any()  # the unshifted channels are zero
  if group:
    k = ops.SHIFT_DIRECTIONS.index(direction)
    np.testing.assert_array_equal(out[..., k * group:(k + 1) * group],
                                  np.asarray(ops.shift_pixels(
                                      x[..., k * group:(k + 1) * group], dy, dx)))
