"""Segment reductions of packed rows against plain-Python loops; out-of-range ids dropped,
masked NaNs never read, jit == eager, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.ops.segments import same_segment_as_previous, segment_ends, segment_sum


def reference_sum(x, ids, n, mask):
  out = np.zeros(n)
  for r in range(x.shape[0]):
    for t in range(x.shape[1]):
      if 0 <= ids[r, t] < n and mask[r, t]:
        out[ids[r, t]] += mask[r, t] * x[r, t]
  return out


def reference_ends(ids, mask):
  out = np.zeros(ids.shape, bool)
  for r in range(ids.shape[0]):
    for t in range(ids.shape[1]):
      nxt = t + 1 < ids.shape[1] and mask[r, t + 1] and ids[r, t + 1] == ids[r, t]
      out[r, t] = bool(mask[r, t]) and not nxt
  return out


@settings(max_examples=15)
@given(st.integers(0, 2**31 - 1))
def test_segment_sum_and_ends_match_loops(seed):
  rows, length, n = 3, 9, 4  # one shape: every example reuses the compiled ops
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, length)).astype(np.float32)
  ids = np.sort(rng.integers(-1, n + 2, (rows, length)), axis=1)  # incl. -1, n, n+1: dropped
  mask = rng.integers(0, 2, (rows, length))
  np.testing.assert_allclose(segment_sum(x, ids, n, mask=mask), reference_sum(x, ids, n, mask),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(segment_sum(x, ids, n), reference_sum(x, ids, n, np.ones_like(mask)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(segment_ends(ids, mask), reference_ends(ids, mask))


def test_masked_nan_is_never_read_and_gradient_is_finite():
  x = jnp.array([[1.0, jnp.nan, 2.0]])
  ids, mask = jnp.array([[0, 0, 1]]), jnp.array([[1, 0, 1]])
  np.testing.assert_array_equal(segment_sum(x, ids, 2, mask=mask), [1.0, 2.0])
  grad = jax.grad(lambda v: segment_sum(v, ids, 2, mask=mask).sum())(x)
  np.testing.assert_array_equal(grad, [[1.0, 0.0, 1.0]])


def test_jit_equals_eager_and_same_segment_as_previous():
  x, ids = jnp.arange(6.0).reshape(2, 3), jnp.array([[0, 0, 2], [1, 1, 1]])
  np.testing.assert_array_equal(jax.jit(segment_sum, static_argnums=2)(x, ids, 2),
                                segment_sum(x, ids, 2))
  np.testing.assert_array_equal(segment_sum(x, ids, 2), [1.0, 12.0])  # id 2 = padding: dropped
  np.testing.assert_array_equal(same_segment_as_previous(ids), [[True, False], [True, True]])


def test_bad_input():
  with pytest.raises(ValueError, match="num_segments"):
    segment_sum(jnp.ones((1, 2)), jnp.zeros((1, 2), int), 0)
  with pytest.raises(ValueError, match="segment_ids"):
    segment_sum(jnp.ones((1, 2)), jnp.zeros((1, 3), int), 2)
