"""Masked reductions and `aggregate` against plain-numpy transcriptions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from numpy_ref import np_aggregate, np_masked_mean, np_masked_var
from rljax.ops.masking import (
    AGG_MODES,
    aggregate,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

B, T = 4, 6


def _data(seed=0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, T)).astype(dtype)
  mask = (rng.random((B, T)) < 0.6).astype(dtype)
  mask[0] = 0.0  # an empty row
  mask[1, 0] = 1.0
  return x, mask


# ---- references ----


def test_masked_reductions_match_numpy(x64):
  x, m = _data()
  np.testing.assert_allclose(masked_sum(x, m), (x * m).sum(), atol=1e-6)
  np.testing.assert_allclose(masked_mean(x, m), np_masked_mean(x, m), atol=1e-6)
  np.testing.assert_allclose(masked_var(x, m), np_masked_var(x, m), atol=1e-6)
  np.testing.assert_allclose(masked_var(x, m, unbiased=False), np_masked_var(x, m, False), atol=1e-6)
  rows = [np_masked_mean(x[b], m[b]) for b in range(B)]
  np.testing.assert_allclose(masked_mean(x, m, axis=-1), rows, atol=1e-6)
  row_vars = [np_masked_var(x[b], m[b]) for b in range(B)]
  np.testing.assert_allclose(masked_var(x, m, axis=-1), row_vars, atol=1e-6)
  assert masked_mean(x, m).dtype == jnp.float64


def test_masked_whiten_matches_numpy(x64):
  x, m = _data(1)
  mu, var = np_masked_mean(x, m), np_masked_var(x, m)
  expected = np.where(m != 0, (x - mu) / np.sqrt(var + 1e-8), 0.0)
  np.testing.assert_allclose(masked_whiten(x, m), expected, atol=1e-6)
  expected_keep = np.where(m != 0, (x - mu) / np.sqrt(var + 1e-8) + mu, 0.0)
  np.testing.assert_allclose(masked_whiten(x, m, shift_mean=False), expected_keep, atol=1e-6)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_numpy(x64, mode):
  L, m = _data(2)
  np.testing.assert_allclose(aggregate(L, m, mode), np_aggregate(L, m, mode), atol=1e-6)
  if mode == "seq-mean-token-sum-norm":
    np.testing.assert_allclose(
        aggregate(L, m, mode, horizon=17), np_aggregate(L, m, mode, horizon=17), atol=1e-6
    )


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_gradient_and_jit(x64, mode):
  L, m = _data(3)
  check_grads(lambda l: aggregate(l, m, mode), (L,), order=2, modes=["rev", "fwd"])
  jitted = jax.jit(aggregate, static_argnames=("mode",))
  np.testing.assert_allclose(jitted(L, m, mode=mode), aggregate(L, m, mode), atol=1e-12)


@pytest.mark.parametrize("mode", [m for m in AGG_MODES if m != "token-sum"])
def test_normalizer_makes_microbatches_exact(x64, mode):
  """Σ over microbatches with a global normalizer == the full-batch loss, and so are gradients."""
  L, m = _data(4)
  if mode == "token-mean":
    count = m.sum()
  else:
    count = (m.sum(-1) > 0).sum()
  full = lambda l: aggregate(l, m, mode)
  split = lambda l: sum(
      aggregate(l[i : i + 2], m[i : i + 2], mode, normalizer=count) for i in (0, 2)
  )
  np.testing.assert_allclose(split(L), full(L), atol=1e-12)
  np.testing.assert_allclose(jax.grad(split)(L), jax.grad(full)(L), atol=1e-12)


def test_token_sum_rejects_normalizer():
  L, m = _data()
  with pytest.raises(ValueError, match="normalizer"):
    aggregate(L, m, "token-sum", normalizer=3.0)


# ---- degenerate and bad input ----


@pytest.mark.parametrize("mode", AGG_MODES)
def test_all_zero_mask_is_zero_with_finite_grad(mode):
  L = jnp.ones((B, T))
  m = jnp.zeros((B, T), bool)
  val, grad = jax.value_and_grad(lambda l: aggregate(l, m, mode))(L)
  assert val == 0.0 and bool(jnp.all(grad == 0))
  for fn in (masked_mean, masked_var, masked_whiten):
    out, g = jax.value_and_grad(lambda x: jnp.sum(fn(x, m)))(L)
    assert out == 0.0 and bool(jnp.all(jnp.isfinite(g)))


def test_single_valid_element_and_constant_input():
  x = jnp.full((B, T), 3.0)
  m = jnp.zeros((B, T)).at[2, 3].set(1.0)
  assert masked_var(x, m) == 0.0  # n - 1 = 0: defined as 0
  assert bool(jnp.all(masked_whiten(x, m) == 0))
  g = jax.grad(lambda x: jnp.sum(masked_whiten(x, jnp.ones((B, T)))))(x)
  assert bool(jnp.all(jnp.isfinite(g)))


def test_bf16_is_reduced_in_float32():
  x, m = _data(5, np.float32)
  xb = jnp.asarray(x, jnp.bfloat16)
  out = aggregate(xb, m, "seq-mean-token-mean")
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np_aggregate(np.asarray(xb, np.float64), m, "seq-mean-token-mean"), atol=1e-5)
  assert masked_whiten(xb, m).dtype == jnp.float32


def test_bad_inputs_name_the_argument():
  L, m = _data()
  with pytest.raises(ValueError, match="token-mean"):
    aggregate(L, m, "mean")
  with pytest.raises(ValueError, match="`mask`"):
    aggregate(L, m[:, :3], "token-mean")
  with pytest.raises(ValueError, match="`loss_mat`"):
    aggregate(L[0], m[0], "token-mean")
  with pytest.raises(ValueError, match="`mask`"):
    masked_mean(L, m[:2])


# ---- properties ----


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100.0))
def test_whiten_gives_zero_mean_unit_variance(seed, scale):
  rng = np.random.default_rng(seed)
  x = (rng.normal(size=(B, T)) * scale).astype(np.float32)
  m = (rng.random((B, T)) < 0.7).astype(np.float32)
  m[0, :2] = 1.0
  w = masked_whiten(x, m)
  np.testing.assert_allclose(masked_mean(w, m), 0.0, atol=1e-4)
  np.testing.assert_allclose(masked_var(w, m), 1.0, rtol=1e-3)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), c=st.floats(-10, 10))
def test_token_mean_is_shift_equivariant(seed, c):
  """aggregate(L + c) = aggregate(L) + c for the mean modes (when some token is valid)."""
  L, m = _data(seed % 1000, np.float32)
  for mode in ("token-mean", "seq-mean-token-mean"):
    np.testing.assert_allclose(aggregate(L + c, m, mode), aggregate(L, m, mode) + c, atol=1e-4)


@pytest.mark.parametrize("fn", [masked_sum, masked_mean, masked_var, masked_whiten])
def test_masked_reductions_gradient_and_jit(x64, fn):
  x, m = _data(6)
  check_grads(lambda v: jnp.sum(jnp.sin(fn(v, m))), (x,), order=1, modes=["rev"])
  np.testing.assert_allclose(jax.jit(fn)(x, m), fn(x, m), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_aggregate_by_segments_equals_aggregate_over_the_unpacked_rows(mode):
  """Three sequences laid into two packed rows (ids 0..2, padding id 3) aggregate as their own
  rows do; garbage under mask 0 and at padding never reaches the value."""
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(3, 5)).astype(np.float32)
  lengths = [5, 2, 3]
  mask = np.arange(5)[None] < np.asarray(lengths)[:, None]
  packed = np.full((2, 6), np.nan, np.float32)
  ids = np.full((2, 6), 3)
  packed[0, :5], ids[0, :5] = rows[0], 0
  packed[1, :2], ids[1, :2] = rows[1, :2], 1
  packed[1, 2:5], ids[1, 2:5] = rows[2, :3], 2
  packed_mask = ids < 3
  want = aggregate(jnp.where(mask, rows, 0.0), mask, mode, horizon=5)
  got = aggregate(jnp.asarray(packed), packed_mask, mode, horizon=5,
                  segment_ids=jnp.asarray(ids), num_segments=3)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  with pytest.raises(ValueError, match="go together"):
    aggregate(jnp.asarray(packed), packed_mask, mode, segment_ids=jnp.asarray(ids))
