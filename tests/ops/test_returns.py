"""Tests for rljax.ops.returns: discounted_returns and gae (masked positions skipped)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.ops import returns as eager

# Jitted entry points with static options (one compilation per dtype rather than one per eager
# primitive); `test_jit_matches_eager` checks the eager path against them.
gae = jax.jit(eager.gae, static_argnames=("gamma", "lam"))
discounted_returns = jax.jit(eager.discounted_returns, static_argnames=("gamma",))

B, T = 4, 7


# ---------------------------------------------------------------- numpy references (float64)
# Written from the closed forms on the *compacted* row (masked positions removed), not from the
# recursion the implementation uses:
#   G_j = Σ_{l≥0} γ^l r_{j+l} + γ^{n−j} b,   δ_j = r_j + γ V_{j+1} − V_j (V_n = b),
#   A_j = Σ_{l≥0} (γλ)^l δ_{j+l},             R_j = A_j + V_j.


def np_discounted_returns(rewards, mask, gamma, bootstrap=None):
  out = np.zeros(rewards.shape, np.float64)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    r = rewards[b, idx].astype(np.float64)
    boot = 0.0 if bootstrap is None else float(bootstrap[b])
    n = len(idx)
    for j in range(n):
      g = sum(gamma**l * r[j + l] for l in range(n - j)) + gamma ** (n - j) * boot
      out[b, idx[j]] = g
  return out


def np_gae(rewards, values, mask, gamma, lam, bootstrap=None):
  adv = np.zeros(rewards.shape, np.float64)
  ret = np.zeros(rewards.shape, np.float64)
  for b in range(rewards.shape[0]):
    idx = np.flatnonzero(mask[b])
    r = rewards[b, idx].astype(np.float64)
    v = values[b, idx].astype(np.float64)
    boot = 0.0 if bootstrap is None else float(bootstrap[b])
    n = len(idx)
    v_next = np.append(v[1:], boot)
    delta = r + gamma * v_next - v
    for j in range(n):
      a = sum((gamma * lam) ** l * delta[j + l] for l in range(n - j))
      adv[b, idx[j]] = a
      ret[b, idx[j]] = a + v[j]
  return adv, ret


def make_inputs(seed, dtype=np.float64, all_masked_row=True):
  """Rewards, values and a mask with leading prompt pad, interleaved gaps and trailing padding."""
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=(B, T)).astype(dtype)
  values = rng.normal(size=(B, T)).astype(dtype)
  mask = rng.random((B, T)) < 0.7
  mask[0] = [1, 1, 0, 0, 1, 1, 0]  # a tool-output gap, then padding
  if all_masked_row:
    mask[3] = 0
  return rewards, values, mask


# ---------------------------------------------------------------- references, float64


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.7, 0.0)])
def test_gae_matches_numpy_reference(x64, gamma, lam):
  rewards, values, mask = make_inputs(0)
  adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam)
  want_adv, want_ret = np_gae(rewards, values, mask, gamma, lam)
  assert adv.dtype == jnp.float64 and ret.dtype == jnp.float64
  np.testing.assert_allclose(adv, want_adv, atol=1e-6)
  np.testing.assert_allclose(ret, want_ret, atol=1e-6)


def test_gae_bootstrap_value_matches_reference(x64):
  rewards, values, mask = make_inputs(1)
  boot = np.random.default_rng(2).normal(size=(B,))
  adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8, bootstrap_value=jnp.asarray(boot))
  want_adv, want_ret = np_gae(rewards, values, mask, 0.9, 0.8, boot)
  np.testing.assert_allclose(adv, want_adv, atol=1e-6)
  np.testing.assert_allclose(ret, want_ret, atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_discounted_returns_matches_numpy_reference(x64, gamma):
  rewards, _, mask = make_inputs(3)
  out = discounted_returns(jnp.asarray(rewards), jnp.asarray(mask), gamma=gamma)
  assert out.dtype == jnp.float64
  np.testing.assert_allclose(out, np_discounted_returns(rewards, mask, gamma), atol=1e-6)
  boot = np.arange(B, dtype=np.float64)
  out = discounted_returns(rewards, mask, gamma=gamma, bootstrap_value=boot)
  np.testing.assert_allclose(out, np_discounted_returns(rewards, mask, gamma, boot), atol=1e-6)


def test_hand_computed_gae():
  # One row, mask [1, 0, 1]; r = [0, 5, 1], V = [0.5, 9, 0.25], γ = 0.5, λ = 0.5.
  # t=2: δ = 1 + 0 − 0.25 = 0.75, A = 0.75.   t=1: skipped (r=5, V=9 ignored), A = 0.
  # t=0: δ = 0 + 0.5·0.25 − 0.5 = −0.375, A = −0.375 + 0.25·0.75 = −0.1875.
  adv, ret = gae(
      jnp.array([[0.0, 5.0, 1.0]]), jnp.array([[0.5, 9.0, 0.25]]), jnp.array([[1, 0, 1]]),
      gamma=0.5, lam=0.5,
  )
  np.testing.assert_allclose(adv, [[-0.1875, 0.0, 0.75]], atol=1e-7)
  np.testing.assert_allclose(ret, [[0.3125, 0.0, 1.0]], atol=1e-7)


# ---------------------------------------------------------------- float32 / bf16


def test_float32_and_bf16():
  rewards, values, mask = make_inputs(4, np.float32)
  adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
  want_adv, want_ret = np_gae(rewards, values, mask, 0.95, 0.9)
  assert adv.dtype == jnp.float32
  np.testing.assert_allclose(adv, want_adv, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, atol=1e-5)

  r16, v16 = jnp.asarray(rewards, jnp.bfloat16), jnp.asarray(values, jnp.bfloat16)
  adv16, ret16 = gae(r16, v16, mask, gamma=0.95, lam=0.9)
  assert adv16.dtype == jnp.float32  # promoted: the recursion runs in float32
  assert np.all(np.isfinite(adv16)) and np.all(np.isfinite(ret16))
  np.testing.assert_allclose(adv16, want_adv, atol=0.1)
  g16 = discounted_returns(r16, mask, gamma=0.95)
  assert g16.dtype == jnp.float32
  np.testing.assert_allclose(g16, np_discounted_returns(rewards, mask, 0.95), atol=0.1)


# ---------------------------------------------------------------- gradients: constants


def test_no_gradient_flows_through_gae_or_returns():
  rewards, values, mask = make_inputs(5, np.float32)
  weights = jnp.asarray(np.random.default_rng(6).normal(size=(B, T)), jnp.float32)
  boot = jnp.ones((B,))

  def objective(r, v, b):
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.95, bootstrap_value=b)
    to_go = discounted_returns(r, mask, gamma=0.9)
    return jnp.sum(weights * (adv + ret)) + jnp.sum(weights * to_go)

  grads = jax.grad(objective, argnums=(0, 1, 2))(jnp.asarray(rewards), jnp.asarray(values), boot)
  for g in grads:
    assert np.all(np.asarray(g) == 0)


# ---------------------------------------------------------------- jit == eager


def test_jit_matches_eager():
  rewards, values, mask = make_inputs(7, np.float32)
  eager_out = eager.gae(rewards, values, mask, gamma=0.9, lam=0.95)
  jitted = gae(rewards, values, mask, gamma=0.9, lam=0.95)
  for a, b in zip(eager_out, jitted):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(
      eager.discounted_returns(rewards, mask, gamma=0.9),
      discounted_returns(rewards, mask, gamma=0.9),
      rtol=1e-6, atol=1e-6,
  )


# ---------------------------------------------------------------- properties (hypothesis)

# gamma and lam are traced arguments so that every drawn value reuses one compilation.
_gae = jax.jit(lambda r, v, m, g, l: eager.gae(r, v, m, gamma=g, lam=l))
_returns = jax.jit(lambda r, m, g: eager.discounted_returns(r, m, gamma=g))
seeds = st.integers(0, 2**31 - 1)
unit = st.floats(0.0, 1.0)


@settings(max_examples=15, deadline=None)
@given(seed=seeds)
def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_values(seed):
  with jax.enable_x64(True):
    rewards, values, mask = make_inputs(seed)
    adv, ret = _gae(rewards, values, mask, 1.0, 1.0)
    to_go = _returns(rewards, mask, 1.0)
    np.testing.assert_allclose(np.where(mask, adv, 0), np.where(mask, to_go - values, 0), atol=1e-9)
    np.testing.assert_allclose(ret, to_go, atol=1e-9)  # λ=1 returns are Monte-Carlo returns


@settings(max_examples=15, deadline=None)
@given(seed=seeds, gamma=unit)
def test_gae_lambda_zero_is_one_step_td_error(seed, gamma):
  with jax.enable_x64(True):
    rewards, values, mask = make_inputs(seed)
    adv, _ = _gae(rewards, values, mask, gamma, 0.0)
    for b in range(B):
      valid = list(np.flatnonzero(mask[b]))
      for k, t in enumerate(valid):
        v_next = values[b, valid[k + 1]] if k + 1 < len(valid) else 0.0
        td = rewards[b, t] + gamma * v_next - values[b, t]
        assert abs(float(adv[b, t]) - td) < 1e-9


@settings(max_examples=15, deadline=None)
@given(seed=seeds, gamma=unit, lam=unit)
def test_gae_with_gaps_equals_gae_on_compacted_sequence(seed, gamma, lam):
  with jax.enable_x64(True):
    rewards, values, mask = make_inputs(seed)
    # Garbage at masked positions must not matter.
    noisy_r = np.where(mask, rewards, 1e3)
    noisy_v = np.where(mask, values, -1e3)
    adv, ret = _gae(noisy_r, noisy_v, mask, gamma, lam)
    for b in range(B):
      idx = np.flatnonzero(mask[b])
      compact = np.zeros((1, T))
      n = len(idx)
      r_c, v_c, m_c = compact.copy(), compact.copy(), compact.copy()
      r_c[0, :n], v_c[0, :n], m_c[0, :n] = rewards[b, idx], values[b, idx], 1
      a_c, ret_c = _gae(r_c, v_c, m_c, gamma, lam)
      scattered = np.zeros(T)
      scattered[idx] = np.asarray(a_c)[0, :n]
      np.testing.assert_allclose(adv[b], scattered, atol=1e-9)
      assert np.all(np.asarray(ret[b])[~mask[b]] == 0)


@settings(max_examples=10, deadline=None)
@given(seed=seeds, gamma=unit)
def test_discounted_returns_recursion_on_consecutive_valid_tokens(seed, gamma):
  with jax.enable_x64(True):
    rewards, _, mask = make_inputs(seed)
    mask = np.ones_like(mask)
    g = np.asarray(_returns(rewards, mask, gamma))
    np.testing.assert_allclose(g[:, :-1], rewards[:, :-1] + gamma * g[:, 1:], atol=1e-9)
    np.testing.assert_allclose(g[:, -1], rewards[:, -1], atol=1e-12)


# ---------------------------------------------------------------- degenerate inputs


def test_all_zero_mask_and_extreme_values_are_finite():
  zeros_mask = jnp.zeros((B, T), bool)
  big = jnp.full((B, T), 1e30, jnp.float32)
  adv, ret = gae(big, -big, zeros_mask, gamma=1.0, lam=1.0)
  assert np.all(np.asarray(adv) == 0) and np.all(np.asarray(ret) == 0)
  assert np.all(np.asarray(discounted_returns(big, zeros_mask, gamma=1.0)) == 0)

  rewards, values, mask = make_inputs(8, np.float32)
  grads = jax.grad(lambda r, v: jnp.sum(gae(r, v, zeros_mask, gamma=0.9, lam=0.9)[0]), (0, 1))(
      jnp.asarray(rewards), jnp.asarray(values)
  )
  assert all(np.all(np.isfinite(g)) for g in grads)


def test_float_mask_counts_nonzero_entries():
  rewards, values, mask = make_inputs(9, np.float32)
  a_bool = gae(rewards, values, mask, gamma=0.9, lam=0.9)[0]
  a_float = gae(rewards, values, mask.astype(np.float32) * 0.5, gamma=0.9, lam=0.9)[0]
  np.testing.assert_allclose(a_bool, a_float)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_errors_naming_the_argument():
  r = jnp.zeros((B, T))
  with pytest.raises(ValueError, match="values"):
    eager.gae(r, jnp.zeros((B, T + 1)), jnp.ones((B, T)), gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match="mask"):
    eager.gae(r, r, jnp.ones((B, 1)), gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match="rewards"):
    eager.gae(jnp.zeros((T,)), jnp.zeros((T,)), jnp.ones((T,)), gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match="gamma"):
    eager.gae(r, r, r, gamma=1.5, lam=1.0)
  with pytest.raises(ValueError, match="lam"):
    eager.gae(r, r, r, gamma=1.0, lam=-0.1)
  with pytest.raises(ValueError, match="bootstrap_value"):
    eager.gae(r, r, r, gamma=1.0, lam=1.0, bootstrap_value=jnp.zeros((B, 1)))
  with pytest.raises(ValueError, match="gamma"):
    eager.discounted_returns(r, r, gamma=2.0)
  with pytest.raises(ValueError, match="mask"):
    eager.discounted_returns(r, jnp.ones((B + 1, T)), gamma=1.0)
