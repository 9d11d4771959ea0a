"""KL estimators (`kl_penalty`) and the exact KL (`kl_from_logits`) against numpy transcriptions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rljax.ops.kl import KL_KINDS, kl_from_logits, kl_penalty

B, T, V = 3, 5, 7
KINDS = list(KL_KINDS)


# ---- numpy references (loops on purpose) ----


def np_kl_penalty(logp, ref_logp, kind, clamp=10.0):
  """Per element, following verl's `kl_penalty` (k3 written as verl writes it: ref − logp)."""
  logp, ref_logp = np.asarray(logp, np.float64), np.asarray(ref_logp, np.float64)
  out = np.zeros(logp.shape)
  for idx in np.ndindex(logp.shape):
    lp, rf = logp[idx], ref_logp[idx]
    if kind in ("k1", "kl"):
      out[idx] = lp - rf
    elif kind in ("k2", "mse"):
      out[idx] = 0.5 * (lp - rf) ** 2
    elif kind in ("k3", "low_var_kl"):
      kl = min(max(rf - lp, -20.0), 20.0)
      kld = math.exp(kl) - kl - 1.0
      out[idx] = kld if clamp is None else min(max(kld, -clamp), clamp)
    else:
      out[idx] = abs(lp - rf)
  return out


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = max(z)
  lse = m + math.log(sum(math.exp(v - m) for v in z))
  return np.array([v - lse for v in z])


def np_kl_from_logits(p_logits, q_logits, temperature=1.0):
  p_logits, q_logits = np.asarray(p_logits, np.float64), np.asarray(q_logits, np.float64)
  out = np.zeros(p_logits.shape[:-1])
  for idx in np.ndindex(out.shape):
    lp = np_log_softmax(p_logits[idx] / temperature)
    lq = np_log_softmax(q_logits[idx] / temperature)
    out[idx] = sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
  return out


def _logps(seed=0, scale=1.0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  logp = -rng.exponential(2.0, size=(B, T))
  ref = logp + scale * rng.normal(size=(B, T))
  return logp.astype(dtype), ref.astype(dtype)


def _logits(seed=0, scale=2.0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  return (scale * rng.normal(size=(B, T, V))).astype(dtype), (
      scale * rng.normal(size=(B, T, V))
  ).astype(dtype)


# ---- kl_penalty: references ----


@pytest.mark.parametrize("kind", KINDS)
def test_kl_penalty_matches_numpy(x64, kind):
  logp, ref = _logps(0, scale=3.0)
  ref[0, :3] = logp[0, :3] + np.array([25.0, -25.0, 8.0])  # beyond the ±20 clip, and k3 > 10
  got = kl_penalty(logp, ref, kind=kind)
  assert got.dtype == jnp.float64 and got.shape == (B, T)
  np.testing.assert_allclose(got, np_kl_penalty(logp, ref, kind), atol=1e-6, rtol=1e-12)
  for clamp in (None, 2.0):
    np.testing.assert_allclose(
        kl_penalty(logp, ref, kind=kind, clamp=clamp),
        np_kl_penalty(logp, ref, kind, clamp=clamp),
        atol=1e-6,
        rtol=1e-12,
    )


def test_clamp_only_affects_k3(x64):
  logp, ref = _logps(1, scale=6.0)
  for kind in ("k1", "k2", "abs"):
    np.testing.assert_array_equal(
        kl_penalty(logp, ref, kind=kind, clamp=0.5), kl_penalty(logp, ref, kind=kind, clamp=None)
    )


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_kl_penalty_float32_and_bf16(kind):
  logp, ref = _logps(2, scale=2.0, dtype=np.float32)
  got = kl_penalty(logp, ref, kind=kind)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_kl_penalty(logp, ref, kind), rtol=1e-5, atol=1e-5)
  lp16, rf16 = jnp.asarray(logp, jnp.bfloat16), jnp.asarray(ref, jnp.bfloat16)
  got16 = kl_penalty(lp16, rf16, kind=kind)
  assert got16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(got16)))
  # Computed in float32 from the bf16-rounded inputs: as exact as float32 allows.
  expected16 = np_kl_penalty(np.asarray(lp16, np.float64), np.asarray(rf16, np.float64), kind)
  np.testing.assert_allclose(got16, expected16, rtol=1e-5, atol=1e-5)


# ---- kl_penalty: gradients ----


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_kl_penalty_gradients(x64, kind):
  logp, ref = _logps(3, scale=1.0)
  ref = np.where(np.abs(logp - ref) < 0.05, ref + 0.1, ref)  # away from the kink of abs
  fn = jax.jit(lambda lp: kl_penalty(lp, ref, kind=kind))
  check_grads(fn, (logp,), order=1, modes=["rev", "fwd"])  # 2nd order: the analytic check below
  d = logp - ref
  analytic = {"k1": np.ones_like(d), "k2": d, "k3": 1 - np.exp(-d), "abs": np.sign(d)}[kind]
  grad_fn = jax.jit(jax.grad(lambda a, b: kl_penalty(a, b, kind=kind).sum(), (0, 1)))
  g_logp, g_ref = grad_fn(logp, ref)
  np.testing.assert_allclose(g_logp, analytic, atol=1e-10)
  np.testing.assert_array_equal(g_ref, np.zeros_like(ref))  # ref_logp is stop-gradient


def test_k3_gradient_is_zero_where_clipped(x64):
  logp = np.zeros(4)
  ref = np.array([-30.0, 30.0, -15.0, 0.5])  # d = 30 (|d|>20), d = -30, k3(15) ≈ 14 > 10, inside
  g = jax.grad(lambda lp: kl_penalty(lp, ref).sum())(logp)
  np.testing.assert_allclose(g, [0.0, 0.0, 0.0, 1 - np.exp(0.5)], atol=1e-12)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_kl_penalty_jit_matches_eager(kind):
  logp, ref = _logps(4, scale=2.0, dtype=np.float32)
  jitted = jax.jit(kl_penalty, static_argnames=("kind", "clamp"))
  expected = kl_penalty(logp, ref, kind=kind)
  np.testing.assert_allclose(jitted(logp, ref, kind=kind), expected, rtol=1e-6)


# ---- kl_penalty: properties ----


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-6, 50.0))
def test_k2_k3_abs_are_non_negative(seed, scale):
  logp, ref = _logps(seed, scale=scale, dtype=np.float32)
  for kind in ("k2", "k3", "abs"):
    for dtype in (jnp.float32, jnp.bfloat16):
      values = kl_penalty(jnp.asarray(logp, dtype), jnp.asarray(ref, dtype), kind=kind)
      assert bool(jnp.all(values >= 0)), (kind, dtype)
      values = kl_penalty(jnp.asarray(logp, dtype), jnp.asarray(ref, dtype), kind=kind, clamp=None)
      assert bool(jnp.all(values >= 0)), (kind, dtype)


def _categorical(seed):
  rng = np.random.default_rng(seed)
  p_logits = rng.normal(size=V)
  q_logits = p_logits + 0.7 * rng.normal(size=V)
  return p_logits, q_logits


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_k1_and_k3_are_unbiased_on_samples(seed):
  """mean(k1) ≈ mean(k3) ≈ KL(p‖q) on samples from p, within Monte-Carlo error."""
  p_logits, q_logits = _categorical(seed)
  log_p, log_q = np_log_softmax(p_logits), np_log_softmax(q_logits)
  n = 20_000
  actions = np.random.default_rng(seed + 1).choice(V, size=n, p=np.exp(log_p))
  with jax.enable_x64(True):  # (not the fixture: hypothesis reruns the body per example)
    exact = float(kl_from_logits(p_logits, q_logits))
    for kind in ("k1", "k3"):
      values = np.asarray(kl_penalty(log_p[actions], log_q[actions], kind=kind))
      stderr = values.std() / math.sqrt(n)
      assert abs(values.mean() - exact) < 5 * stderr + 1e-9, (kind, values.mean(), exact, stderr)


def test_k1_k3_expectations_are_exact_kl(x64):
  """Σ_a p(a)·k(a) equals KL(p‖q) exactly for k1 and k3 (k2 is biased)."""
  p_logits = _categorical(7)[0]
  q_logits = p_logits + 2.0 * np.random.default_rng(8).normal(size=V)  # far apart: k2 is off
  log_p, log_q = np_log_softmax(p_logits), np_log_softmax(q_logits)
  exact = np_kl_from_logits(p_logits, q_logits)
  p = np.exp(log_p)
  for kind in ("k1", "k3"):
    expectation = float(np.sum(p * np.asarray(kl_penalty(log_p, log_q, kind=kind))))
    np.testing.assert_allclose(expectation, exact, atol=1e-12)
  k2 = float(np.sum(p * np.asarray(kl_penalty(log_p, log_q, kind="k2"))))
  assert abs(k2 - exact) > 1e-2


def test_expected_gradients(x64):
  """E_{a~π}[∇k2] = ∇KL(π‖π_ref); E[∇k3] = ∇KL(π_ref‖π); E[∇k1] = 0 (exact expectations)."""
  theta, ref_logits = _categorical(11)
  log_ref = np_log_softmax(ref_logits)

  def expected_grad(kind):
    def surrogate(th):
      log_pi = jax.nn.log_softmax(th)
      weights = jax.lax.stop_gradient(jnp.exp(log_pi))  # the sampling is not differentiated
      return jnp.sum(weights * kl_penalty(log_pi, log_ref, kind=kind))

    return jax.jit(jax.grad(surrogate))(theta)

  forward = jax.jit(jax.grad(lambda th: kl_from_logits(th, ref_logits)))(theta)
  reverse = jax.jit(jax.grad(lambda th: kl_from_logits(ref_logits, th)))(theta)
  np.testing.assert_allclose(expected_grad("k2"), forward, atol=1e-12)
  np.testing.assert_allclose(expected_grad("k3"), reverse, atol=1e-12)
  np.testing.assert_allclose(expected_grad("k1"), np.zeros(V), atol=1e-12)
  assert np.abs(forward - reverse).max() > 1e-3  # the two really differ


# ---- kl_penalty: degenerate and bad input ----


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kl_penalty_extreme_log_ratios_are_finite(kind, dtype):
  logp = jnp.asarray([[-100.0, 0.0, -1e-3, -50.0]], dtype)
  ref = jnp.asarray([[0.0, -100.0, -1e-3, -50.0]], dtype)
  for clamp in (10.0, None):
    fn = lambda lp: kl_penalty(lp, ref, kind=kind, clamp=clamp).sum()  # noqa: E731
    value, grad = jax.jit(jax.value_and_grad(fn))(logp)
    assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))


def test_kl_penalty_bad_input():
  logp, ref = _logps(0, dtype=np.float32)
  with pytest.raises(ValueError, match="kind.*'k3'"):
    kl_penalty(logp, ref, kind="k4")
  with pytest.raises(ValueError, match="ref_logp"):
    kl_penalty(logp, ref[:, :2])
  with pytest.raises(ValueError, match="clamp"):
    kl_penalty(logp, ref, clamp=0.0)


# ---- kl_from_logits ----


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kl_from_logits_matches_numpy(x64, temperature):
  p_logits, q_logits = _logits(0)
  got = kl_from_logits(p_logits, q_logits, temperature=temperature)
  assert got.shape == (B, T) and got.dtype == jnp.float64
  np.testing.assert_allclose(got, np_kl_from_logits(p_logits, q_logits, temperature), atol=1e-6)


def test_kl_from_logits_float32_and_bf16():
  p_logits, q_logits = _logits(1, dtype=np.float32)
  got = kl_from_logits(p_logits, q_logits)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_kl_from_logits(p_logits, q_logits), rtol=1e-5, atol=1e-6)
  p16, q16 = jnp.asarray(p_logits, jnp.bfloat16), jnp.asarray(q_logits, jnp.bfloat16)
  got16 = kl_from_logits(p16, q16)
  assert got16.dtype == jnp.float32
  expected16 = np_kl_from_logits(np.asarray(p16, np.float64), np.asarray(q16, np.float64))
  np.testing.assert_allclose(got16, expected16, rtol=1e-5, atol=1e-6)


def test_kl_from_logits_gradients(x64):
  p_logits, q_logits = _logits(2, scale=1.0)
  p_logits, q_logits = p_logits[:1, :2], q_logits[:1, :2]  # [1, 2, V]: finite differences cost
  check_grads(jax.jit(kl_from_logits), (p_logits, q_logits), order=1, modes=["rev", "fwd"])
  # Second order: test_kl_hessian_at_equal_logits_is_fisher compares with the analytic Hessian.


def test_kl_hessian_at_equal_logits_is_fisher(x64):
  """∇²_θ KL(p_old‖softmax(θ)) at θ = old is the categorical Fisher diag(p) − p pᵀ (for TRPO)."""
  old = _categorical(3)[0]
  hessian = jax.jit(jax.hessian(lambda th: kl_from_logits(jax.lax.stop_gradient(old), th)))(old)
  p = np.exp(np_log_softmax(old))
  np.testing.assert_allclose(hessian, np.diag(p) - np.outer(p, p), atol=1e-12)
  assert float(kl_from_logits(old, old)) == 0.0


def test_kl_from_logits_jit_matches_eager():
  p_logits, q_logits = _logits(3, dtype=np.float32)
  jitted = jax.jit(kl_from_logits, static_argnames=("temperature",))
  np.testing.assert_allclose(
      jitted(p_logits, q_logits, temperature=0.5),
      kl_from_logits(p_logits, q_logits, temperature=0.5),
      rtol=1e-6,
  )


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-4, 30.0), shift=st.floats(-50.0, 50.0))
def test_kl_from_logits_non_negative_and_zero_on_equal(seed, scale, shift):
  rng = np.random.default_rng(seed)
  p_logits = (3.0 * rng.normal(size=(B, T, V))).astype(np.float32)
  q_logits = (p_logits + scale * rng.normal(size=(B, T, V))).astype(np.float32)
  assert bool(jnp.all(kl_from_logits(p_logits, q_logits) >= 0))
  assert bool(jnp.all(kl_from_logits(q_logits, p_logits) >= 0))
  np.testing.assert_array_equal(kl_from_logits(p_logits, p_logits), np.zeros((B, T)))
  # A constant shift of the logits is the same distribution.
  np.testing.assert_allclose(kl_from_logits(p_logits, p_logits + np.float32(shift)), 0.0, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kl_from_logits_extreme_logits_are_finite(dtype):
  rng = np.random.default_rng(4)
  p_logits = jnp.asarray(1e4 * np.sign(rng.normal(size=(B, T, V))), dtype)
  q_logits = jnp.asarray(-p_logits, dtype)  # q gives ~0 probability where p puts its mass
  fn = lambda a, b: kl_from_logits(a, b).sum()  # noqa: E731
  grad_fn = jax.jit(jax.grad(fn, (0, 1)))
  value = kl_from_logits(p_logits, q_logits)
  assert bool(jnp.all(jnp.isfinite(value))) and bool(jnp.all(value > 1e3))
  grads = grad_fn(p_logits, q_logits)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  # -inf in p's logits marks excluded tokens: finite value and gradients, same KL as -1e4.
  masked = jnp.asarray([[0.0, -jnp.inf, 1.0]], jnp.float32)
  other = jnp.asarray([[1.0, 2.0, 3.0]], jnp.float32)
  np.testing.assert_allclose(
      kl_from_logits(masked, other),
      np_kl_from_logits(np.array([[0.0, -1e4, 1.0]]), np.array([[1.0, 2.0, 3.0]])),
      rtol=1e-6,
  )
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grad_fn(masked, other))


def test_kl_from_logits_bad_input():
  p_logits, q_logits = _logits(0, dtype=np.float32)
  with pytest.raises(ValueError, match="q_logits"):
    kl_from_logits(p_logits, q_logits[..., :3])
  with pytest.raises(ValueError, match="temperature"):
    kl_from_logits(p_logits, q_logits, temperature=0.0)
  with pytest.raises(ValueError, match="p_logits"):
    kl_from_logits(np.float32(1.0), np.float32(2.0))
