"""The clipped value loss against a numpy transcription."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from numpy_ref import np_aggregate, np_masked_mean
from rljax.losses.value import value_loss

B, T = 3, 5


def _batch(seed=0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  old = rng.normal(size=(B, T))
  values = old + 0.5 * rng.normal(size=(B, T))
  returns = old + rng.normal(size=(B, T))
  mask = (rng.random((B, T)) < 0.8).astype(np.float64)
  mask[0, 0] = 1.0
  return tuple(a.astype(dtype) for a in (values, old, returns, mask))


def np_value_loss_mat(v, old, ret, eps):
  out = np.zeros_like(v)
  for b in range(v.shape[0]):
    for t in range(v.shape[1]):
      e = (v[b, t] - ret[b, t]) ** 2
      if eps is not None:
        vc = old[b, t] + min(max(v[b, t] - old[b, t], -eps), eps)
        e = max(e, (vc - ret[b, t]) ** 2)
      out[b, t] = 0.5 * e
  return out


@pytest.mark.parametrize("eps", [None, 0.2])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
def test_value_loss_matches_numpy(x64, eps, agg):
  v, old, ret, mask = _batch()
  loss, metrics = value_loss(v, old, ret, mask, clip_eps=eps, agg=agg)
  np.testing.assert_allclose(loss, np_aggregate(np_value_loss_mat(v, old, ret, eps), mask, agg), atol=1e-6)
  if eps is not None:
    vc = old + np.clip(v - old, -eps, eps)
    frac = np_masked_mean((vc - ret) ** 2 > (v - ret) ** 2, mask)
    np.testing.assert_allclose(metrics["vf_clipfrac"], frac, atol=1e-6)
    assert 0 < frac < 1
  np.testing.assert_allclose(metrics["value_error"], np_masked_mean((v - ret) ** 2, mask), atol=1e-6)


def test_value_loss_gradient_and_jit(x64):
  v, old, ret, mask = _batch(1)
  for eps in (None, 0.2):
    f = lambda x: value_loss(x, old, ret, mask, clip_eps=eps)[0]
    check_grads(f, (v,), order=1, modes=["rev"])
    np.testing.assert_allclose(jax.jit(f)(v), f(v), rtol=1e-12)
  # unclipped: d/dV ½(V − R)² averaged over tokens = (V − R)·m / Σm
  g = jax.grad(lambda x: value_loss(x, old, ret, mask)[0])(v)
  np.testing.assert_allclose(g, (v - ret) * mask / mask.sum(), atol=1e-9)
  g_old, g_ret = jax.grad(lambda o, r: value_loss(v, o, r, mask, clip_eps=0.2)[0], (0, 1))(old, ret)
  assert bool(jnp.all(g_old == 0)) and bool(jnp.all(g_ret == 0))


@settings(max_examples=20)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.01, 1.0))
def test_clipped_loss_is_pessimistic(seed, eps):
  """The clipped loss is never below the unclipped one, and equal when V stays within ±ε."""
  v, old, ret, mask = _batch(seed, np.float32)
  clipped, _ = value_loss(v, old, ret, mask, clip_eps=eps)
  plain, _ = value_loss(v, old, ret, mask)
  assert float(clipped) >= float(plain) - 1e-6
  inside = old + np.clip(v - old, -0.9 * eps, 0.9 * eps)
  np.testing.assert_allclose(
      value_loss(inside, old, ret, mask, clip_eps=eps)[0], value_loss(inside, old, ret, mask)[0], rtol=1e-6
  )


def test_degenerate_and_bad_inputs():
  v, old, ret, mask = _batch(2, np.float32)
  loss, g = jax.value_and_grad(lambda x: value_loss(x, old, ret, np.zeros_like(mask), clip_eps=0.2)[0])(v)
  assert loss == 0 and bool(jnp.all(g == 0))
  out, _ = value_loss(jnp.asarray(v, jnp.bfloat16), old, ret, mask)
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out))
  with pytest.raises(ValueError, match="`returns`"):
    value_loss(v, old, ret[:, :2], mask)
  with pytest.raises(ValueError, match="clip_eps"):
    value_loss(v, old, ret, mask, clip_eps=0.0)
