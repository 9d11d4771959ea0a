"""Policy-gradient losses against numpy transcriptions, analytic gradients and their invariants."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from numpy_ref import np_aggregate, np_masked_mean
from rljax.losses.policy import (
    cispo_loss,
    grpo_loss,
    gspo_loss,
    policy_gradient_loss,
    ppo_clip_loss,
    ppo_penalty_loss,
    ppo_ptx_loss,
)
from rljax.ops.masking import AGG_MODES

B, T = 4, 5


def _batch(seed=0, spread=0.5, dtype=np.float64):
  rng = np.random.default_rng(seed)
  old = -np.abs(rng.normal(size=(B, T))) - 0.1
  logp = old + spread * rng.normal(size=(B, T))
  ref = old + 0.3 * rng.normal(size=(B, T))
  adv = rng.normal(size=(B, T))
  mask = (rng.random((B, T)) < 0.75).astype(np.float64)
  mask[0] = 0.0
  mask[1, :2] = 1.0
  cast = lambda a: a.astype(dtype)
  return cast(logp), cast(old), cast(ref), cast(adv), cast(mask)


# ---- numpy references ----


def np_ratio(logp, old):
  return np.exp(np.clip(logp - old, -20, 20))


def np_ppo_clip_mat(logp, old, adv, eps_lo, eps_hi, c=None):
  out = np.zeros_like(logp)
  for b in range(logp.shape[0]):
    for t in range(logp.shape[1]):
      r, a = np_ratio(logp[b, t], old[b, t]), adv[b, t]
      loss = max(-a * r, -a * min(max(r, 1 - eps_lo), 1 + eps_hi))
      if c is not None and a < 0:
        loss = min(loss, -a * c)
      out[b, t] = loss
  return out


def np_k3(logp, ref, clamp=10.0):
  d = np.clip(logp - ref, -20, 20)
  return np.clip(np.exp(-d) - 1 + d, -clamp, clamp)


# ---- values against numpy ----


@pytest.mark.parametrize("agg", AGG_MODES)
def test_policy_gradient_loss_matches_numpy(x64, agg):
  logp, _, _, adv, mask = _batch()
  loss, _ = policy_gradient_loss(logp, adv, mask, agg=agg)
  np.testing.assert_allclose(loss, np_aggregate(-adv * logp, mask, agg), atol=1e-6)
  seq_adv = adv[:, 0]
  loss, _ = policy_gradient_loss(logp, seq_adv, mask, agg=agg)
  np.testing.assert_allclose(loss, np_aggregate(-seq_adv[:, None] * logp, mask, agg), atol=1e-6)


@pytest.mark.parametrize(
    "eps_lo,eps_hi,c", [(0.2, None, None), (0.2, 0.28, None), (0.1, 0.3, 3.0), (0.2, None, 1.5)]
)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_ppo_clip_matches_numpy(x64, eps_lo, eps_hi, c, agg):
  logp, old, _, adv, mask = _batch(1, spread=0.6)
  logp[1, 0], adv[1, 0] = old[1, 0] + 1.0, -1.0  # r = e > 1.5 on a negative advantage
  loss, metrics = ppo_clip_loss(
      logp, old, adv, mask, clip_eps=eps_lo, clip_eps_high=eps_hi, clip_ratio_c=c, agg=agg
  )
  hi = eps_lo if eps_hi is None else eps_hi
  mat = np_ppo_clip_mat(logp, old, adv, eps_lo, hi, c)
  np.testing.assert_allclose(loss, np_aggregate(mat, mask, agg), atol=1e-6)
  r = np_ratio(logp, old)
  unclipped, clipped = -adv * r, -adv * np.clip(r, 1 - eps_lo, 1 + hi)
  np.testing.assert_allclose(metrics["clipfrac"], np_masked_mean(clipped > unclipped, mask), atol=1e-6)
  np.testing.assert_allclose(metrics["approx_kl"], np_masked_mean(r - 1 - np.log(r), mask), atol=1e-6)
  np.testing.assert_allclose(metrics["ratio_mean"], np_masked_mean(r, mask), atol=1e-6)
  if c is not None:
    lower = (adv < 0) & (np.maximum(unclipped, clipped) > -adv * c)
    np.testing.assert_allclose(metrics["clipfrac_lower"], np_masked_mean(lower, mask), atol=1e-6)
    assert c > 2 or metrics["clipfrac_lower"] > 0  # c = 1.5 exercises the dual clip


def test_ppo_clip_gradient_matches_analytic(x64):
  """d/dlogp of max(−A r, −A clip(r)) is −A r where the unclipped term is active, else 0."""
  logp, old, _, adv, mask = _batch(2, spread=0.6)
  grad = jax.grad(lambda lp: ppo_clip_loss(lp, old, adv, mask)[0])(logp)
  r = np_ratio(logp, old)
  active = -adv * r >= -adv * np.clip(r, 0.8, 1.2)
  expected = np.where(active, -adv * r, 0.0) * mask / mask.sum()
  np.testing.assert_allclose(grad, expected, atol=1e-6)
  assert 0 < active[mask > 0].mean() < 1  # both branches exercised


def test_ppo_penalty_matches_numpy(x64):
  logp, old, _, adv, mask = _batch(3)
  r = np_ratio(logp, old)
  for kind, kl in {
      "k1": old - logp,
      "k2": 0.5 * (old - logp) ** 2,
      "k3": r - 1 - (logp - old),
  }.items():
    loss, metrics = ppo_penalty_loss(logp, old, adv, mask, beta=0.7, kl_kind=kind)
    np.testing.assert_allclose(loss, np_aggregate(-adv * r + 0.7 * kl, mask, "token-mean"), atol=1e-6)
    np.testing.assert_allclose(metrics["kl"], np_masked_mean(kl, mask), atol=1e-6)
  check_grads(lambda lp: ppo_penalty_loss(lp, old, adv, mask, beta=0.7)[0], (logp,), order=1)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_grpo_matches_numpy(x64, kind):
  logp, old, ref, adv, mask = _batch(4, spread=0.4)
  loss, metrics = grpo_loss(logp, old, ref, adv, mask, beta=0.04, kl_kind=kind)
  d = logp - ref
  kl = {"k1": d, "k2": 0.5 * d**2, "k3": np_k3(logp, ref)}[kind]
  mat = np_ppo_clip_mat(logp, old, adv, 0.2, 0.2) + 0.04 * kl
  np.testing.assert_allclose(loss, np_aggregate(mat, mask, "seq-mean-token-mean"), atol=1e-6)
  np.testing.assert_allclose(metrics["kl"], np_masked_mean(kl, mask), atol=1e-6)


def test_grpo_on_policy_gradient_is_pg_plus_kl_gradient(x64):
  """With old = logp (r ≡ 1) the gradient is the policy gradient plus β ∇KL (k3: 1 − e^{−d})."""
  logp, _, ref, adv, mask = _batch(5)
  beta = 0.1
  grad = jax.grad(lambda lp: grpo_loss(lp, lp, ref, adv, mask, beta=beta)[0])(logp)
  n = mask.sum(-1, keepdims=True)
  weight = np.where(n > 0, mask / np.where(n > 0, n, 1), 0) / (n[:, 0] > 0).sum()
  expected = weight * (-adv + beta * (1 - np.exp(-(logp - ref))))
  np.testing.assert_allclose(grad, expected, atol=1e-6)
  loss0, m0 = grpo_loss(logp, logp, None, adv, mask, beta=0.0)
  assert m0["clipfrac"] == 0 and m0["approx_kl"] == 0 and m0["kl"] == 0
  np.testing.assert_allclose(loss0, np_aggregate(-adv, mask, "seq-mean-token-mean"), atol=1e-6)


def test_gspo_matches_numpy_and_sequence_gradient(x64):
  logp, old, _, adv, mask = _batch(6, spread=1e-3)
  seq_adv = adv[:, 0]
  loss, metrics = gspo_loss(logp, old, seq_adv, mask)

  def np_seq_ratio(lp):
    out = []
    for b in range(B):
      n = mask[b].sum()
      out.append(1.0 if n == 0 else math.exp(((lp[b] - old[b]) * mask[b]).sum() / n))
    return np.array(out)

  s = np_seq_ratio(logp)
  mat = np.maximum(-seq_adv * s, -seq_adv * np.clip(s, 1 - 3e-4, 1 + 4e-4))[:, None] * np.ones((B, T))
  np.testing.assert_allclose(loss, np_aggregate(mat, mask, "seq-mean-token-mean"), atol=1e-6)
  valid = mask.sum(-1) > 0
  np.testing.assert_allclose(metrics["seq_ratio_mean"], s[valid].mean(), atol=1e-6)

  def sequence_objective(lp):  # the paper's objective, written on sequences
    sr = jnp.exp(jnp.sum((lp - old) * mask, -1) / jnp.maximum(mask.sum(-1), 1))
    per_seq = jnp.maximum(-seq_adv * sr, -seq_adv * jnp.clip(sr, 1 - 3e-4, 1 + 4e-4))
    return jnp.sum(jnp.where(valid, per_seq, 0)) / valid.sum()

  np.testing.assert_allclose(loss, sequence_objective(logp), atol=1e-9)
  np.testing.assert_allclose(
      jax.grad(lambda lp: gspo_loss(lp, old, seq_adv, mask)[0])(logp),
      jax.grad(sequence_objective)(logp),
      atol=1e-9,
  )


def test_cispo_matches_numpy_and_gradient(x64):
  logp, old, _, adv, mask = _batch(7, spread=0.6)
  loss, metrics = cispo_loss(logp, old, adv, mask)
  w = np.clip(np_ratio(logp, old), 0.8, 1.28)
  np.testing.assert_allclose(loss, np_aggregate(-w * adv * logp, mask, "token-mean"), atol=1e-6)
  grad = jax.grad(lambda lp: cispo_loss(lp, old, adv, mask)[0])(logp)
  np.testing.assert_allclose(grad, -w * adv * mask / mask.sum(), atol=1e-6)  # clipped tokens too
  r = np_ratio(logp, old)
  np.testing.assert_allclose(metrics["clipfrac"], np_masked_mean((r < 0.8) | (r > 1.28), mask), atol=1e-6)


def test_ppo_ptx_adds_scaled_nll(x64):
  logp, old, _, adv, mask = _batch(8)
  ptx_logp = -np.abs(np.random.default_rng(0).normal(size=(3, 7)))
  ptx_mask = np.ones((3, 7))
  ptx_mask[2, 4:] = 0
  rl = ppo_clip_loss(logp, old, adv, mask)
  loss, metrics = ppo_ptx_loss(rl, ptx_logp, ptx_mask, ptx_coef=0.5)
  nll = np_aggregate(-ptx_logp, ptx_mask, "token-mean")
  np.testing.assert_allclose(loss, float(rl[0]) + 0.5 * nll, atol=1e-6)
  np.testing.assert_allclose(metrics["ptx_nll"], nll, atol=1e-6)
  assert "clipfrac" in metrics and "rl_loss" in metrics


# ---- gradients, jit, stop-gradient ----

LOSSES = {
    "pg": lambda lp, old, ref, adv, m: policy_gradient_loss(lp, adv, m),
    "ppo_clip": lambda lp, old, ref, adv, m: ppo_clip_loss(lp, old, adv, m, clip_ratio_c=3.0),
    "ppo_penalty": lambda lp, old, ref, adv, m: ppo_penalty_loss(lp, old, adv, m, beta=0.1),
    "grpo": lambda lp, old, ref, adv, m: grpo_loss(lp, old, ref, adv, m),
    "gspo": lambda lp, old, ref, adv, m: gspo_loss(lp, old, adv[:, 0], m),
    "cispo": lambda lp, old, ref, adv, m: cispo_loss(lp, old, adv, m),
}


@pytest.mark.parametrize("name", LOSSES)
def test_gradient_check_and_jit(x64, name):
  logp, old, ref, adv, mask = _batch(9, spread=0.05)  # away from clip kinks
  fn = LOSSES[name]
  if name != "cispo":  # CISPO's gradient is by design not that of its value (sg on the weight)
    check_grads(lambda lp: fn(lp, old, ref, adv, mask)[0], (logp,), order=1, modes=["rev"])
  eager = fn(logp, old, ref, adv, mask)
  jitted = jax.jit(fn)(logp, old, ref, adv, mask)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-12, atol=1e-12)
  for k in eager[1]:
    np.testing.assert_allclose(jitted[1][k], eager[1][k], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_no_gradient_into_old_ref_or_advantages(name):
  logp, old, ref, adv, mask = _batch(10, dtype=np.float32)
  fn = LOSSES[name]
  grads = jax.grad(lambda o, r, a: fn(logp, o, r, a, mask)[0], argnums=(0, 1, 2))(old, ref, adv)
  for g in grads:
    assert bool(jnp.all(g == 0))


@pytest.mark.parametrize("name", LOSSES)
def test_extreme_and_degenerate_inputs_are_finite(name):
  logp, old, ref, adv, mask = _batch(11, dtype=np.float32)
  fn = LOSSES[name]
  extreme = old + np.where(np.arange(T) % 2 == 0, 100.0, -100.0).astype(np.float32)
  for lp, m in ((extreme, mask), (logp, np.zeros_like(mask))):
    (loss, metrics), g = jax.value_and_grad(lambda x: fn(x, old, ref, adv, m), has_aux=True)(lp)
    assert bool(jnp.isfinite(loss)) and bool(jnp.all(jnp.isfinite(g)))
    assert all(bool(jnp.isfinite(v)) for v in metrics.values())
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  loss32, _ = fn(logp, old, ref, adv, mask)
  loss16, _ = fn(bf(logp), bf(old), bf(ref), bf(adv), mask)
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, atol=0.05, rtol=0.05)


# ---- properties ----


@settings(max_examples=20)
@given(
    a=st.floats(-5, 5).filter(lambda a: abs(a) > 1e-3),
    log_r=st.floats(-3, 3),
    eps=st.floats(0.05, 0.4),
)
def test_ppo_clip_gradient_vanishes_on_the_clipped_side(a, log_r, eps):
  """A > 0 and r > 1 + ε, or A < 0 and r < 1 − ε: the token's gradient is exactly 0."""
  lp = jnp.full((1, 1), log_r, jnp.float32)
  g = jax.grad(lambda x: ppo_clip_loss(x, jnp.zeros((1, 1)), jnp.full((1, 1), a), jnp.ones((1, 1)), clip_eps=eps)[0])(lp)
  r = math.exp(log_r)
  if (a > 0 and r > 1 + eps + 1e-4) or (a < 0 and r < 1 - eps - 1e-4):
    assert float(g[0, 0]) == 0.0
  elif abs(r - 1) < eps - 1e-4:
    np.testing.assert_allclose(g[0, 0], -a * r, rtol=1e-5)


@settings(max_examples=15)
@given(seed=st.integers(0, 10_000))
def test_ratio_one_gives_policy_gradient(seed):
  """With old = logp every clipped loss reduces to −agg(A) and its gradient to REINFORCE's."""
  logp, _, ref, adv, mask = _batch(seed, dtype=np.float32)
  pg_grad = jax.grad(lambda lp: policy_gradient_loss(lp, adv, mask)[0])(logp)
  for fn, value in ((ppo_clip_loss, -adv), (cispo_loss, -adv * logp)):
    loss, m = fn(logp, logp, adv, mask)
    np.testing.assert_allclose(loss, np_aggregate(value, mask, "token-mean"), atol=1e-5)
    g = jax.grad(lambda lp: fn(lp, jax.lax.stop_gradient(lp), adv, mask)[0])(logp)
    np.testing.assert_allclose(g, pg_grad, atol=1e-6)
    assert float(m["clipfrac"]) == 0.0


# ---- bad input ----


def test_bad_inputs_name_the_argument():
  logp, old, ref, adv, mask = _batch(dtype=np.float32)
  with pytest.raises(ValueError, match="`old_logp`"):
    ppo_clip_loss(logp, old[:, :3], adv, mask)
  with pytest.raises(ValueError, match="`advantages`"):
    ppo_clip_loss(logp, old, adv[:2, 0], mask)
  with pytest.raises(ValueError, match="`agg` 'mean'; valid choices: .*seq-mean-token-mean"):
    ppo_clip_loss(logp, old, adv, mask, agg="mean")
  with pytest.raises(ValueError, match="clip_ratio_c"):
    ppo_clip_loss(logp, old, adv, mask, clip_ratio_c=0.5)
  with pytest.raises(ValueError, match="clip_eps"):
    cispo_loss(logp, old, adv, mask, clip_eps=-0.1)
  with pytest.raises(ValueError, match="`ref_logp`"):
    grpo_loss(logp, old, None, adv, mask, beta=0.1)
  with pytest.raises(ValueError, match="k3"):
    grpo_loss(logp, old, ref, adv, mask, kl_kind="k9")
  with pytest.raises(ValueError, match="ptx_coef"):
    ppo_ptx_loss(ppo_clip_loss(logp, old, adv, mask), logp, mask, ptx_coef=-1.0)
