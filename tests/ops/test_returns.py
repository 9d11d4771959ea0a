"""Tests for rljax.ops.returns: discounted_returns and gae (masked positions skipped).

Both functions are jitted inside with traced coefficients, so the tests call them directly: one
compilation per input shape, dtype and option (`whiten`, bootstrap or not), shared by every test
and every hypothesis example (which draw values, never shapes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.ops import returns
from rljax.ops.masking import masked_whiten
from rljax.ops.returns import discounted_returns, gae

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


def np_gae_loop(rewards, values, mask, gamma, lam, bootstrap=None):
  """The docstring's recursion transcribed literally (scalar loop, both carries skip gaps)."""
  adv = np.zeros(rewards.shape, np.float64)
  for b in range(rewards.shape[0]):
    next_value = 0.0 if bootstrap is None else float(bootstrap[b])
    running = 0.0
    for t in reversed(range(rewards.shape[1])):
      if not mask[b, t]:
        continue  # both carries pass across unchanged; A_t = 0
      delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
      running = delta + gamma * lam * running
      next_value = float(values[b, t])
      adv[b, t] = running
  return adv, np.where(mask, adv + values, 0.0)


def np_whiten(x, mask):
  valid = x[mask != 0]
  if valid.size <= 1:
    return np.zeros_like(x)
  mean, var = valid.mean(), valid.var(ddof=1)
  return np.where(mask != 0, (x - mean) / np.sqrt(var + 1e-8), 0.0)


# Multi-turn rows: prompt padding, agent turns separated by observation (tool-output) spans in
# the middle of the row, trailing padding; one row with no valid token.
MULTI_TURN = np.array(
    [
        [0, 1, 1, 0, 0, 1, 0],  # prompt | turn 1 | observation | turn 2 | pad
        [1, 0, 1, 0, 0, 1, 1],  # turn | obs | turn | obs | turn
        [1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0],
    ],
    bool,
)


def make_inputs(seed, dtype=np.float64, random_mask=False):
  """Rewards, values and a multi-turn mask (or a random one with the same first and last rows)."""
  rng = np.random.default_rng(seed)
  rewards = rng.normal(size=(B, T)).astype(dtype)
  values = rng.normal(size=(B, T)).astype(dtype)
  mask = MULTI_TURN.copy()
  if random_mask:
    mask[1:3] = rng.random((2, T)) < 0.6
  return rewards, values, mask


# ---------------------------------------------------------------- references, float64


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.95), (0.7, 0.0)])
def test_gae_matches_numpy_references(x64, gamma, lam):
  rewards, values, mask = make_inputs(0)
  adv, ret = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam)
  want_adv, want_ret = np_gae(rewards, values, mask, gamma, lam)
  loop_adv, loop_ret = np_gae_loop(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(loop_adv, want_adv, atol=1e-12)  # the two references agree
  np.testing.assert_allclose(loop_ret, want_ret, atol=1e-12)
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
  # The bootstrap enters only through the last valid token of each row: δ gains γ·b there.
  no_boot, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
  last = [np.flatnonzero(row)[-1] for row in mask[:3]]
  for b, t in enumerate(last):
    assert abs(float(adv[b, t] - no_boot[b, t]) - 0.9 * boot[b]) < 1e-9


seeds = st.integers(0, 2**31 - 1)
unit = st.floats(0.0, 1.0)


@settings(max_examples=15, deadline=None)
@given(seed=seeds, gamma=unit, lam=unit, bootstrap=st.booleans())
def test_gae_multi_turn_matches_numpy_loop(seed, gamma, lam, bootstrap):
  with jax.enable_x64(True):
    rewards, values, mask = make_inputs(seed, random_mask=True)
    boot = np.random.default_rng(seed + 1).normal(size=(B,)) if bootstrap else None
    # Garbage at masked positions must not matter.
    noisy_r = np.where(mask, rewards, 1e3)
    noisy_v = np.where(mask, values, -1e3)
    adv, ret = gae(noisy_r, noisy_v, mask, gamma=gamma, lam=lam, bootstrap_value=boot)
    want_adv, want_ret = np_gae_loop(rewards, values, mask, gamma, lam, boot)
    np.testing.assert_allclose(adv, want_adv, atol=1e-9)
    np.testing.assert_allclose(ret, want_ret, atol=1e-9)
    assert np.all(np.asarray(adv)[~mask] == 0) and np.all(np.asarray(ret)[~mask] == 0)


@pytest.mark.parametrize("gamma", [1.0, 0.8])
def test_discounted_returns_matches_numpy_reference(x64, gamma):
  rewards, _, mask = make_inputs(3, random_mask=True)
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


# ---------------------------------------------------------------- whitening


def test_whiten_option_is_masked_whiten(x64):
  rewards, values, mask = make_inputs(10, random_mask=True)
  adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
  white, ret_w = gae(rewards, values, mask, gamma=0.9, lam=0.95, whiten=True)
  np.testing.assert_array_equal(ret_w, ret)  # returns come from the un-whitened advantages
  np.testing.assert_allclose(white, jax.jit(masked_whiten)(adv, mask), atol=1e-12)
  want = np_whiten(np_gae(rewards, values, mask, 0.9, 0.95)[0], mask)
  np.testing.assert_allclose(white, want, atol=1e-9)
  valid = np.asarray(white)[mask]
  assert abs(valid.mean()) < 1e-12 and abs(valid.std(ddof=1) - 1) < 1e-6


def test_whiten_equals_masked_whiten_in_float32():
  # The whitening written out for advantages already 0 at masked positions (`_whiten_zeroed`)
  # against the library's general `masked_whiten`, on a larger float32 multi-turn batch with
  # garbage (NaN, 1e30) at masked positions.
  rng = np.random.default_rng(14)
  rewards, values = (rng.normal(size=(8, 96)).astype(np.float32) for _ in range(2))
  mask = rng.random((8, 96)) < 0.7
  mask[3] = False
  rewards[~mask], values[~mask] = np.nan, 1e30
  adv, _ = gae(rewards, values, mask, gamma=0.99, lam=0.9)
  white, _ = gae(rewards, values, mask, gamma=0.99, lam=0.9, whiten=True)
  np.testing.assert_allclose(white, jax.jit(masked_whiten)(adv, mask), rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(white)[~mask] == 0)


def test_whiten_degenerate_masks_give_zeros():
  rewards, values, _ = make_inputs(11, np.float32)
  single = np.zeros((B, T), bool)
  single[2, 3] = True
  for mask in (np.zeros((B, T), bool), single):
    white, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0, whiten=True)
    assert np.all(np.asarray(white) == 0)  # n = 0, and n = 1 (variance 0: x − μ = 0)


# ---------------------------------------------------------------- float32 / bf16


def test_float32_and_bf16():
  rewards, values, mask = make_inputs(4, np.float32, random_mask=True)
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


# ---------------------------------------------------------------- jitted inside: user jit, vmap


def test_calls_inside_a_user_jit_and_traced_coefficients():
  rewards, values, mask = make_inputs(7, np.float32, random_mask=True)
  direct = gae(rewards, values, mask, gamma=0.9, lam=0.95)
  static = jax.jit(lambda r, v, m: gae(r, v, m, gamma=0.9, lam=0.95))(rewards, values, mask)
  traced = jax.jit(lambda r, v, m, g, l: gae(r, v, m, gamma=g, lam=l))(
      rewards, values, mask, 0.9, 0.95
  )
  for got in (static, traced):
    for a, b in zip(got, direct):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # With concrete coefficients γλ is rounded once from double precision: bit-identical results.
  np.testing.assert_array_equal(static[0], direct[0])
  np.testing.assert_array_equal(
      jax.jit(lambda r, m: discounted_returns(r, m, gamma=0.9))(rewards, mask),
      discounted_returns(rewards, mask, gamma=0.9),
  )


def test_sweeping_coefficients_does_not_recompile():
  rewards, values, mask = make_inputs(12, np.float32)
  gae(rewards, values, mask, gamma=1.0, lam=1.0)
  discounted_returns(rewards, mask, gamma=1.0)
  before = returns._gae._cache_size(), returns._discounted_returns._cache_size()
  for gamma, lam in [(0.99, 0.95), (0.5, 0.0), (1, 1), (np.float64(0.9), jnp.float32(0.3))]:
    gae(rewards, values, mask, gamma=gamma, lam=lam)
    discounted_returns(rewards, mask, gamma=gamma)
  assert (returns._gae._cache_size(), returns._discounted_returns._cache_size()) == before


def test_vmap_matches_per_slice_calls():
  rng = np.random.default_rng(13)
  rewards, values = (rng.normal(size=(3, B, T)).astype(np.float32) for _ in range(2))
  mask = np.stack([MULTI_TURN, MULTI_TURN[::-1], np.ones((B, T), bool)])
  boot = rng.normal(size=(3, B)).astype(np.float32)
  got = jax.vmap(lambda r, v, m, b: gae(r, v, m, gamma=0.9, lam=0.8, bootstrap_value=b))(
      rewards, values, mask, boot
  )
  for i in range(3):
    want = np_gae(rewards[i], values[i], mask[i], 0.9, 0.8, boot[i])
    for a, w in zip(got, want):
      np.testing.assert_allclose(a[i], w, atol=1e-5)


# ---------------------------------------------------------------- gradients: constants


def test_no_gradient_flows_through_gae_or_returns():
  rewards, values, mask = make_inputs(5, np.float32, random_mask=True)
  weights = jnp.asarray(np.random.default_rng(6).normal(size=(B, T)), jnp.float32)
  boot = jnp.ones((B,))

  def objective(r, v, b, gamma, lam):
    adv, ret = gae(r, v, mask, gamma=gamma, lam=lam, bootstrap_value=b)
    white, _ = gae(r, v, mask, gamma=gamma, lam=lam, bootstrap_value=b, whiten=True)
    to_go = discounted_returns(r, mask, gamma=gamma, bootstrap_value=b)
    return jnp.sum(weights * (adv + ret + white + to_go))

  args = (jnp.asarray(rewards), jnp.asarray(values), boot, 0.9, 0.95)
  grads = jax.grad(objective, argnums=(0, 1, 2, 3, 4))(*args)
  for g in grads:  # none to the inputs, and none to traced coefficients either
    assert np.all(np.asarray(g) == 0)


# ---------------------------------------------------------------- properties (hypothesis)


@settings(max_examples=15, deadline=None)
@given(seed=seeds)
def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_values(seed):
  with jax.enable_x64(True):
    rewards, values, mask = make_inputs(seed, random_mask=True)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = discounted_returns(rewards, mask, gamma=1.0)
    np.testing.assert_allclose(np.where(mask, adv, 0), np.where(mask, to_go - values, 0), atol=1e-9)
    np.testing.assert_allclose(ret, to_go, atol=1e-9)  # λ=1 returns are Monte-Carlo returns


@settings(max_examples=15, deadline=None)
@given(seed=seeds, gamma=unit)
def test_gae_lambda_zero_is_one_step_td_error(seed, gamma):
  with jax.enable_x64(True):
    rewards, values, mask = make_inputs(seed, random_mask=True)
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
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
    rewards, values, mask = make_inputs(seed, random_mask=True)
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    # Every row compacted to the front (gaps removed), padding after: the same [B, T] shape.
    r_c, v_c, m_c = np.zeros((B, T)), np.zeros((B, T)), np.zeros((B, T), bool)
    for b in range(B):
      idx = np.flatnonzero(mask[b])
      n = len(idx)
      r_c[b, :n], v_c[b, :n], m_c[b, :n] = rewards[b, idx], values[b, idx], True
    a_c, ret_c = gae(r_c, v_c, m_c, gamma=gamma, lam=lam)
    for b in range(B):
      idx = np.flatnonzero(mask[b])
      n = len(idx)
      np.testing.assert_allclose(np.asarray(adv[b])[idx], np.asarray(a_c[b])[:n], atol=1e-9)
      np.testing.assert_allclose(np.asarray(ret[b])[idx], np.asarray(ret_c[b])[:n], atol=1e-9)
      assert np.all(np.asarray(ret[b])[~mask[b]] == 0)


@settings(max_examples=10, deadline=None)
@given(seed=seeds, gamma=unit)
def test_discounted_returns_recursion_on_consecutive_valid_tokens(seed, gamma):
  with jax.enable_x64(True):
    rewards, _, mask = make_inputs(seed)
    mask = np.ones_like(mask)
    g = np.asarray(discounted_returns(rewards, mask, gamma=gamma))
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
  rewards, values, mask = make_inputs(9, np.float32, random_mask=True)
  a_bool = gae(rewards, values, mask, gamma=0.9, lam=0.9)[0]
  a_float = gae(rewards, values, mask.astype(np.float32) * 0.5, gamma=0.9, lam=0.9)[0]
  np.testing.assert_allclose(a_bool, a_float)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_errors_naming_the_argument():
  r = jnp.zeros((B, T))
  with pytest.raises(ValueError, match="values"):
    gae(r, jnp.zeros((B, T + 1)), jnp.ones((B, T)), gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match="mask"):
    gae(r, r, jnp.ones((B, 1)), gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match="rewards"):
    gae(jnp.zeros((T,)), jnp.zeros((T,)), jnp.ones((T,)), gamma=1.0, lam=1.0)
  with pytest.raises(ValueError, match="gamma"):
    gae(r, r, r, gamma=1.5, lam=1.0)
  with pytest.raises(ValueError, match="lam"):
    gae(r, r, r, gamma=1.0, lam=-0.1)
  with pytest.raises(ValueError, match="bootstrap_value"):
    gae(r, r, r, gamma=1.0, lam=1.0, bootstrap_value=jnp.zeros((B, 1)))
  with pytest.raises(ValueError, match="gamma"):
    discounted_returns(r, r, gamma=2.0)
  with pytest.raises(ValueError, match="mask"):
    discounted_returns(r, jnp.ones((B + 1, T)), gamma=1.0)
