"""Parameter-free fusion operators (cen_jax/fusion/ops.py) against hand-computed truths.

References: docs/papers.md §1.1(b) (exchange), §1.1(c) (L1 partition), §3.2 (AsymFusion
ShiftShuffle), and the official code (CEN `Exchange`, AsymFusion `ShiftShuffle`).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cen_jax.fusion import ops

THR = 0.02


def rand(seed, shape):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def as_x(values):
  """values [M, W, C] (hand-written rows) -> x [M, N=1, H=1, W, C] float32."""
  return jnp.asarray(np.asarray(values, np.float32)[:, None, None])


# ----------------------------------------------------------------------------- exchange


def test_exchange_two_branches_hand_computed():
  x = as_x([[[1, 2, 3], [4, 5, 6]],
            [[10, 20, 30], [40, 50, 60]]])
  scales = jnp.asarray([[0.5, 0.01, -0.01],     # keep, replace, replace (|-0.01| < thr)
                        [THR, -0.5, 0.0]])       # keep (|s| == thr), keep (|-0.5|), replace
  expected = as_x([[[1, 20, 30], [4, 50, 60]],
                   [[10, 20, 3], [40, 50, 6]]])
  out = ops.exchange(x, scales, THR)
  assert out.shape == x.shape and out.dtype == x.dtype
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_exchange_threshold_boundary_and_just_below():
  x = as_x([[[1, 2]], [[7, 8]]])
  below = np.nextafter(np.float32(THR), np.float32(0))
  scales = jnp.asarray([[THR, below], [-THR, -below]], jnp.float32)
  out = ops.exchange(x, scales, THR)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(as_x([[[1, 8]], [[7, 2]]])))


def test_exchange_two_branches_all_below_is_full_swap():
  x = rand(0, (2, 2, 3, 3, 5))
  out = ops.exchange(x, jnp.zeros((2, 5)), THR)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x[::-1]))


def test_exchange_three_branches_hand_computed():
  x = as_x([[[1, 2, 3]],
            [[10, 20, 30]],
            [[100, 200, 300]]])
  scales = jnp.asarray([[0.1, 0.0, 0.1],
                        [0.0, 0.0, 0.1],
                        [0.1, 0.1, -0.001]])
  expected = as_x([[[1, 110, 3]],             # ch1: (20 + 200) / 2
                   [[50.5, 101, 30]],         # ch0: (1 + 100) / 2, ch1: (2 + 200) / 2
                   [[100, 200, 16.5]]])       # ch2: (3 + 30) / 2
  np.testing.assert_allclose(np.asarray(ops.exchange(x, scales, THR)), np.asarray(expected),
                             rtol=1e-6)


def test_exchange_four_branches_hand_computed():
  x = as_x([[[1, 2, 3]],
            [[10, 20, 30]],
            [[100, 200, 300]],
            [[1000, 2000, 3000]]])
  scales = jnp.asarray([[0.0, 1.0, 1.0],
                        [1.0, 0.0, 1.0],
                        [1.0, 1.0, 0.0],
                        [0.0, 0.0, 0.0]])
  expected = as_x([[[370, 2, 3]],             # (10 + 100 + 1000) / 3
                   [[10, 734, 30]],           # (2 + 200 + 2000) / 3
                   [[100, 200, 1011]],        # (3 + 30 + 3000) / 3
                   [[37, 74, 111]]])          # (1+10+100)/3, (2+20+200)/3, (3+30+300)/3
  np.testing.assert_allclose(np.asarray(ops.exchange(x, scales, THR)), np.asarray(expected),
                             rtol=1e-6)


def test_exchange_single_branch_is_identity():
  x = rand(1, (1, 2, 3, 4, 6))
  scales = jnp.zeros((1, 6))  # all below threshold: still nothing to exchange with
  np.testing.assert_array_equal(np.asarray(ops.exchange(x, scales, THR)), np.asarray(x))


def test_exchange_rejects_mismatched_scales():
  with pytest.raises(ValueError):
    ops.exchange(jnp.zeros((2, 1, 2, 2, 4)), jnp.zeros((2, 3)), THR)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_exchange_keeps_dtype(dtype):
  x = jnp.ones((3, 1, 2, 2, 4), dtype)
  out = ops.exchange(x, jnp.zeros((3, 4), jnp.float32), THR)
  assert out.dtype == dtype


def expected_input_grad(w, keep):
  """d/dx sum(w * exchange(x)) by the rule of §1.1(b): own kept channels pass w, and every
  replaced channel of branch m' sends w[m'] / (M - 1) to each other branch."""
  num = w.shape[0]
  k = keep.reshape((num,) + (1,) * (w.ndim - 2) + (w.shape[-1],))
  g = np.where(k, w, 0.0)
  for m in range(num):
    for mp in range(num):
      if mp != m:
        g[m] = g[m] + np.where(k[mp], 0.0, w[mp]) / (num - 1)
  return g


@pytest.mark.parametrize('num', [2, 3, 4])
def test_exchange_gradient_routing(num):
  rng = np.random.RandomState(num)
  c = 6
  x = rng.randn(num, 2, 3, 3, c).astype(np.float32)
  w = rng.randn(*x.shape).astype(np.float32)
  scales = rng.uniform(0.1, 1.0, (num, c)).astype(np.float32)
  scales *= rng.choice([-1, 1], (num, c))
  keep = rng.rand(num, c) < 0.5
  keep[:, 0] = True      # a channel nobody exchanges
  keep[:, 1] = False     # a channel everybody exchanges
  scales[~keep] = rng.uniform(-0.015, 0.015, (~keep).sum())
  loss = lambda x, s: jnp.sum(jnp.asarray(w) * ops.exchange(x, s, THR))
  gx, gs = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(scales))
  np.testing.assert_allclose(np.asarray(gx), expected_input_grad(w, keep), rtol=1e-5, atol=1e-6)
  # The mask is not differentiated: no gradient to the scales through the exchange.
  np.testing.assert_array_equal(np.asarray(gs), np.zeros_like(scales))


def test_exchange_gradient_two_branches_hand_computed():
  # One pixel, C = 3. Branch 0 replaces ch1, branch 1 replaces ch2.
  x = as_x([[[1., 2., 3.]], [[4., 5., 6.]]])
  scales = jnp.asarray([[1., 0., 1.], [1., 1., 0.]])
  w = as_x([[[1., 2., 3.]], [[10., 20., 30.]]])
  g = jax.grad(lambda x: jnp.sum(w * ops.exchange(x, scales, THR)))(x)
  # d/dx0 = [w0[0], 0 (replaced, no grad to own branch), w0[2] + w1[2] (branch 1 takes x0[2])]
  # d/dx1 = [w1[0], w1[1] + w0[1] (branch 0 takes x1[1]), 0]
  expected = as_x([[[1., 0., 33.]], [[10., 22., 0.]]])
  np.testing.assert_array_equal(np.asarray(g), np.asarray(expected))


def test_exchange_jacobian_three_branches():
  # x: [3, 1, 1, 1, 1]; branch 1 replaces its only channel by mean(x0, x2).
  scales = jnp.asarray([[1.0], [0.0], [1.0]])
  jac = jax.jacobian(lambda x: ops.exchange(x, scales, THR))(jnp.ones((3, 1, 1, 1, 1)))
  jac = np.asarray(jac).reshape(3, 3)
  np.testing.assert_allclose(jac, [[1, 0, 0], [0.5, 0, 0.5], [0, 0, 1]], rtol=1e-7)


@pytest.mark.parametrize('num', [3, 4])
def test_exchange_branch_permutation_equivariance(num):
  rng = np.random.RandomState(10 + num)
  c = 7
  x = rng.randn(num, 2, 3, 4, c).astype(np.float32)
  scales = rng.uniform(-0.05, 0.05, (num, c)).astype(np.float32)  # ~40% below threshold
  assert (np.abs(scales) < THR).any() and (np.abs(scales) >= THR).any()
  ref = np.asarray(ops.exchange(jnp.asarray(x), jnp.asarray(scales), THR))
  for perm in itertools.permutations(range(num)):
    perm = np.asarray(perm)
    out = ops.exchange(jnp.asarray(x[perm]), jnp.asarray(scales[perm]), THR)
    np.testing.assert_allclose(np.asarray(out), ref[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('num', [2, 3])
def test_exchange_under_jit_vmap_pmap(num):
  ndev = jax.device_count()
  assert ndev == 8, 'conftest should force 8 host devices'
  rng = np.random.RandomState(num)
  c = 5
  x = jnp.asarray(rng.randn(ndev, num, 2, 3, 3, c).astype(np.float32))
  scales = jnp.asarray(rng.uniform(-0.05, 0.05, (ndev, num, c)).astype(np.float32))
  op = functools.partial(ops.exchange, threshold=THR)
  eager = np.stack([np.asarray(op(x[i], scales[i])) for i in range(ndev)])
  np.testing.assert_array_equal(np.asarray(jax.jit(op)(x[3], scales[3])), eager[3])
  np.testing.assert_array_equal(np.asarray(jax.vmap(op)(x, scales)), eager)
  np.testing.assert_array_equal(np.asarray(jax.pmap(op)(x, scales)), eager)


# ----------------------------------------------------------------------------- L1 partition


def test_partition_two_branches_official_halves():
  for c in (4, 5, 7, 64, 65):
    assert ops.partition_bounds(c, 2) == [(0, c // 2), (c // 2, c)]
  np.testing.assert_array_equal(
      ops.sparsity_masks(2, 5),
      np.array([[1, 1, 0, 0, 0],
                [0, 0, 1, 1, 1]], bool))


def test_partition_hand_computed_three_and_four():
  assert ops.partition_bounds(7, 3) == [(0, 2), (2, 4), (4, 7)]
  assert ops.partition_bounds(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
  np.testing.assert_array_equal(
      ops.sparsity_masks(3, 7),
      np.array([[1, 1, 0, 0, 0, 0, 0],
                [0, 0, 1, 1, 0, 0, 0],
                [0, 0, 0, 0, 1, 1, 1]], bool))


@pytest.mark.parametrize('num', [2, 3, 4])
@pytest.mark.parametrize('c', [4, 5, 7, 13, 64, 255, 256])
def test_partition_contiguous_disjoint_covering(num, c):
  bounds = ops.partition_bounds(c, num)
  assert len(bounds) == num
  assert bounds[0][0] == 0 and bounds[-1][1] == c
  for (a0, b0), (a1, _) in zip(bounds, bounds[1:]):
    assert b0 == a1  # contiguous and disjoint
  sizes = [b - a for a, b in bounds]
  assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
  mask = ops.sparsity_masks(num, c)
  assert mask.shape == (num, c) and mask.dtype == bool
  np.testing.assert_array_equal(mask.sum(0), np.ones(c))  # every channel in exactly one part
  for m, (a, b) in enumerate(bounds):
    idx = np.flatnonzero(mask[m])
    np.testing.assert_array_equal(idx, np.arange(a, b))


def test_l1_penalty_hand_sum():
  s1 = jnp.asarray([[1., -2., 3., 4.],
                    [5., 6., -7., 8.]])           # M=2: |1| + |-2| + |-7| + |8| = 18
  s2 = jnp.asarray([[1., 2., 3., 4., 5.],
                    [-6., 7., 8., 9., 10.],
                    [11., 12., 13., -14., 15.]])  # M=3 parts [0,1) [1,3) [3,5): 1 + 15 + 29 = 45
  assert float(ops.l1_penalty([s1])) == 18.0
  assert float(ops.l1_penalty([s2])) == 45.0
  assert float(ops.l1_penalty([s1, s2])) == 63.0
  assert float(ops.l1_penalty([])) == 0.0


def test_l1_penalty_gradient_is_masked_sign():
  s = jnp.asarray([[0.5, -0.5, 0.5, -0.5],
                   [-0.5, 0.5, -0.5, 0.5]])
  g = jax.grad(lambda s: ops.l1_penalty([s]))(s)
  np.testing.assert_array_equal(np.asarray(g), [[1, -1, 0, 0], [0, 0, -1, 1]])


def test_fraction_below_threshold_hand_computed():
  thr = 0.1
  s1 = jnp.asarray([[0.05, 0.2, 0.0, 0.0],       # branch 0 part [0, 2): 0.05 below, 0.2 not
                    [0.0, 0.0, -0.05, 0.1]])     # branch 1 part [2, 4): |-0.05| below, 0.1 not
  s2 = jnp.asarray([[-0.01, 5.0],                # branch 0 part [0, 1): below
                    [0.0, 5.0]])                 # branch 1 part [1, 2): not below
  frac = np.asarray(ops.fraction_below_threshold([s1, s2], thr))
  np.testing.assert_allclose(frac, [2 / 3, 1 / 3], rtol=1e-6)
  frac1 = np.asarray(ops.fraction_below_threshold([s1], thr))
  np.testing.assert_allclose(frac1, [0.5, 0.5], rtol=1e-6)


# ----------------------------------------------------------------------------- AsymFusion


def test_shift_split_official_numbers():
  # docs/papers.md §3.2: planes -> g / S.
  assert ops.shift_split(64) == (12, 48)
  assert ops.shift_split(128) == (25, 100)
  assert ops.shift_split(256) == (51, 204)
  assert ops.shift_split(512) == (102, 408)
  assert ops.shift_split(7) == (1, 4)
  assert ops.shift_split(13) == (2, 8)


@pytest.mark.parametrize('c, expected0, expected1', [
    # C = 7: g = 1, S = 4 -> the last 3 channels come from the other branch.
    (7, [0, 1, 2, 3, 14, 15, 16], [10, 11, 12, 13, 4, 5, 6]),
    # C = 12: g = 2, S = 8 -> last 4 swapped.
    (12, [0, 1, 2, 3, 4, 5, 6, 7, 18, 19, 20, 21], [10, 11, 12, 13, 14, 15, 16, 17, 8, 9, 10, 11]),
    # C = 13: g = 2, S = 8 -> last 5 swapped.
    (13, [0, 1, 2, 3, 4, 5, 6, 7, 18, 19, 20, 21, 22],
     [10, 11, 12, 13, 14, 15, 16, 17, 8, 9, 10, 11, 12]),
    # C = 5: g = 1, S = 4 -> only the last channel swapped.
    (5, [0, 1, 2, 3, 14], [10, 11, 12, 13, 4]),
])
def test_channel_shuffle_hand_computed(c, expected0, expected1):
  x0 = np.arange(c, dtype=np.float32)
  x1 = 10 + np.arange(c, dtype=np.float32)
  x = jnp.asarray(np.stack([x0, x1])[:, None, None, None, :] * np.ones((1, 2, 3, 2, 1), np.float32))
  out = np.asarray(ops.channel_shuffle(x))
  assert out.shape == x.shape
  np.testing.assert_array_equal(out[0, 1, 2, 1], expected0)
  np.testing.assert_array_equal(out[1, 0, 0, 0], expected1)
  # Spatially constant input -> spatially constant output.
  np.testing.assert_array_equal(out, np.broadcast_to(out[:, :1, :1, :1], out.shape))


@pytest.mark.parametrize('c', [5, 7, 8, 12, 13, 64])
def test_channel_shuffle_twice_is_identity(c):
  x = rand(c, (2, 2, 3, 4, c))
  once = ops.channel_shuffle(x)
  assert not np.array_equal(np.asarray(once), np.asarray(x))
  np.testing.assert_array_equal(np.asarray(ops.channel_shuffle(once)), np.asarray(x))


def test_channel_shuffle_single_branch_identity_and_rejects_three():
  x = rand(0, (1, 1, 2, 2, 7))
  np.testing.assert_array_equal(np.asarray(ops.channel_shuffle(x)), np.asarray(x))
  with pytest.raises(ValueError):
    ops.channel_shuffle(jnp.zeros((3, 1, 2, 2, 7)))


def test_pixel_shift_hand_computed_small():
  # H = 2, W = 3, C = 5 (g = 1, S = 4); every channel holds [[1, 2, 3], [4, 5, 6]].
  img = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
  x = jnp.asarray(np.repeat(img[None, None, :, :, None], 5, axis=-1))
  out = np.asarray(ops.pixel_shift(x))[0, 0]
  np.testing.assert_array_equal(out[..., 0], [[0, 0, 0], [1, 2, 3]])   # group 0: down
  np.testing.assert_array_equal(out[..., 1], [[0, 1, 2], [0, 4, 5]])   # group 1: right
  np.testing.assert_array_equal(out[..., 2], [[2, 3, 0], [5, 6, 0]])   # group 2: left
  np.testing.assert_array_equal(out[..., 3], [[4, 5, 6], [0, 0, 0]])   # group 3: up
  np.testing.assert_array_equal(out[..., 4], np.zeros((2, 3)))         # tail: zero


@pytest.mark.parametrize('c', [7, 12, 13])
def test_pixel_shift_single_one_per_group(c):
  g, s = ops.shift_split(c)
  h, w = 4, 5
  i0, j0 = 2, 1
  moved = {0: (i0 + 1, j0), 1: (i0, j0 + 1), 2: (i0, j0 - 1), 3: (i0 - 1, j0)}
  for k in range(4):
    for ch in (k * g, (k + 1) * g - 1):   # first and last channel of the group
      x = np.zeros((1, 1, h, w, c), np.float32)
      x[0, 0, i0, j0, ch] = 1.0
      out = np.asarray(ops.pixel_shift(jnp.asarray(x)))
      expected = np.zeros_like(x)
      expected[(0, 0) + moved[k] + (ch,)] = 1.0
      np.testing.assert_array_equal(out, expected, err_msg=f'group {k} channel {ch}')
  for ch in range(s, c):  # tail channels are zero in the shift output
    x = np.zeros((1, 1, h, w, c), np.float32)
    x[0, 0, i0, j0, ch] = 1.0
    np.testing.assert_array_equal(np.asarray(ops.pixel_shift(jnp.asarray(x))), 0.0)


def test_pixel_shift_content_leaves_through_the_border():
  # A 1 on the border that moves outward disappears (zero padding, no wrap-around).
  c, h, w = 5, 3, 4
  edge = {0: (h - 1, 1), 1: (1, w - 1), 2: (1, 0), 3: (0, 1)}
  for k, (i, j) in edge.items():
    x = np.zeros((1, 1, h, w, c), np.float32)
    x[0, 0, i, j, k] = 1.0
    np.testing.assert_array_equal(np.asarray(ops.pixel_shift(jnp.asarray(x))), 0.0)


def reference_pixel_shift(x):
  """Direct loops over out[i, j] = x[i + dy, j + dx] (zero outside), per docs/papers.md §3.2."""
  c = x.shape[-1]
  g = c // 5
  dirs = [(-1, 0), (0, -1), (0, 1), (1, 0)]
  h, w = x.shape[-3], x.shape[-2]
  out = np.zeros_like(x)
  for k, (dy, dx) in enumerate(dirs):
    for i in range(h):
      for j in range(w):
        si, sj = i + dy, j + dx
        if 0 <= si < h and 0 <= sj < w:
          out[..., i, j, k * g:(k + 1) * g] = x[..., si, sj, k * g:(k + 1) * g]
  return out


@pytest.mark.parametrize('c', [5, 7, 12, 13])
def test_pixel_shift_random_against_loops(c):
  x = np.random.RandomState(c).randn(2, 2, 4, 6, c).astype(np.float32)
  out = np.asarray(ops.pixel_shift(jnp.asarray(x)))
  np.testing.assert_array_equal(out, reference_pixel_shift(x))
  # Per branch, no mixing: branch 0's shift does not depend on branch 1.
  x2 = x.copy()
  x2[1] += 1.0
  np.testing.assert_array_equal(np.asarray(ops.pixel_shift(jnp.asarray(x2)))[0], out[0])


def test_asym_ops_under_jit_and_vmap():
  x = rand(3, (3, 2, 1, 4, 5, 12))
  np.testing.assert_array_equal(np.asarray(jax.jit(ops.pixel_shift)(x[0])),
                                np.asarray(ops.pixel_shift(x[0])))
  np.testing.assert_array_equal(np.asarray(jax.vmap(ops.channel_shuffle)(x)),
                                np.stack([np.asarray(ops.channel_shuffle(v)) for v in x]))
  np.testing.assert_array_equal(np.asarray(jax.vmap(ops.pixel_shift)(x)),
                                np.stack([np.asarray(ops.pixel_shift(v)) for v in x]))
