"""Tests for rljax.losses.preference (KTO, ORPO, SimPO, CPO) against float64 numpy references."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rljax.losses.dpo import dpo_loss
from rljax.losses.preference import cpo_loss, kto_loss, log1mexp, orpo_loss, simpo_loss

B = 6
seeds = st.integers(0, 2**31 - 1)


def logsig(x):
  return -np.logaddexp(0.0, -x)


def sig(x):
  return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------------------------
# numpy references (loops, float64), transcribed from the papers / TRL trainers.
# --------------------------------------------------------------------------------------------


def np_kto(logp, ref, desirable, kl_logp, kl_ref, beta, wd, wu):
  """TRL KTOTrainer.kto_loss + get_batch_loss_metrics: concatenate weighted losses, then mean."""
  z = max(float(np.mean(np.asarray(kl_logp) - np.asarray(kl_ref))), 0.0)
  chosen_losses, rejected_losses, chosen_rewards, rejected_rewards = [], [], [], []
  for i in range(len(logp)):
    r = logp[i] - ref[i]
    if desirable[i]:
      chosen_losses.append(wd * (1 - sig(beta * (r - z))))
      chosen_rewards.append(beta * r)
    else:
      rejected_losses.append(wu * (1 - sig(beta * (z - r))))
      rejected_rewards.append(beta * r)
  loss = np.mean(chosen_losses + rejected_losses)
  rc = np.mean(chosen_rewards) if chosen_rewards else 0.0
  rr = np.mean(rejected_rewards) if rejected_rewards else 0.0
  metrics = {"kl": z, "rewards_chosen": rc, "rewards_rejected": rr, "reward_margin": rc - rr,
             "desirable_fraction": len(chosen_losses) / len(logp)}
  return loss, metrics


def np_pair_metrics(rc, rr):
  rc, rr = np.asarray(rc), np.asarray(rr)
  return {"rewards_chosen": rc.mean(), "rewards_rejected": rr.mean(),
          "reward_margin": (rc - rr).mean(), "reward_accuracy": (rc > rr).mean()}


def np_orpo(ac, ar, nll, beta):
  """ORPOTrainer.odds_ratio_loss: log-odds with log1p(-exp(.)), then nll − β·mean(logσ)."""
  log_odds, ratio = [], []
  for c, r in zip(ac, ar):
    lo = (c - r) - (math.log1p(-math.exp(c)) - math.log1p(-math.exp(r)))
    log_odds.append(lo)
    ratio.append(logsig(lo))
  nll_mean = float(np.mean(nll))
  loss = nll_mean - beta * np.mean(ratio)
  metrics = {"nll": nll_mean, "log_odds_ratio": np.mean(ratio),
             "log_odds_chosen": np.mean(log_odds),
             **np_pair_metrics(beta * np.asarray(ac), beta * np.asarray(ar))}
  return loss, metrics


def np_simpo(ac, ar, beta, gamma):
  """SimPO eq. 6: −logσ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ), on average log-probs."""
  loss = np.mean([-logsig(beta * c - beta * r - gamma) for c, r in zip(ac, ar)])
  return loss, np_pair_metrics(beta * np.asarray(ac), beta * np.asarray(ar))


def np_cpo(c, r, nll, beta, alpha):
  """CPO: L_prefer = −logσ(β log π(y_w) − β log π(y_l)); L = L_prefer + α·L_NLL."""
  pref = np.mean([-logsig(beta * (ci - ri)) for ci, ri in zip(c, r)])
  nll_mean = float(np.mean(nll))
  metrics = {"nll": nll_mean, "preference_loss": pref,
             **np_pair_metrics(beta * np.asarray(c), beta * np.asarray(r))}
  return pref + alpha * nll_mean, metrics


def kto_inputs(seed, pattern="mixed", kl_shift=0.5):
  rng = np.random.default_rng(seed)
  logp = rng.normal(-20.0, 4.0, B)
  ref = logp + rng.normal(0.0, 2.0, B)
  kl_logp = rng.normal(-30.0, 3.0, B)
  kl_ref = kl_logp - kl_shift + rng.normal(0.0, 0.3, B)
  desirable = {
      "mixed": rng.random(B) < 0.5, "all": np.ones(B, bool), "none": np.zeros(B, bool)
  }[pattern]
  if pattern == "mixed":
    desirable[:2] = [True, False]
  return logp, ref, desirable, kl_logp, kl_ref


def avg_inputs(seed, low=-3.0):
  rng = np.random.default_rng(seed)
  ac = rng.uniform(low, -0.05, B)
  ar = rng.uniform(low, -0.05, B)
  nll = rng.uniform(0.5, 3.0, B)
  return ac, ar, nll


def assert_metrics(got, want, atol=1e-6):
  assert set(got) == set(want)
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, atol=atol, err_msg=name)


# ----------------------------------- KTO -------------------------------------------------------

KTO_CASES = [
    ("mixed", 0.5, 1.0, 1.0),
    ("mixed", -0.5, 1.0, 1.0),  # negative KL estimate → z clamped to 0
    ("mixed", 0.5, 1.33, 0.7),
    ("all", 0.5, 1.0, 2.0),
    ("none", 0.5, 2.0, 1.0),
]


@pytest.mark.parametrize("pattern,kl_shift,wd,wu", KTO_CASES)
def test_kto_matches_numpy_reference(x64, pattern, kl_shift, wd, wu):
  logp, ref, desirable, kl_logp, kl_ref = kto_inputs(0, pattern, kl_shift)
  loss, metrics = kto_loss(logp, ref, desirable, kl_logp, kl_ref, beta=0.2, desirable_weight=wd,
                           undesirable_weight=wu)
  want, want_metrics = np_kto(logp, ref, desirable, kl_logp, kl_ref, 0.2, wd, wu)
  assert loss.dtype == jnp.float64
  np.testing.assert_allclose(loss, want, atol=1e-6)
  assert_metrics(metrics, want_metrics)


def test_kto_float32_bfloat16_jit_and_gradients(x64):
  logp, ref, desirable, kl_logp, kl_ref = kto_inputs(1)
  want, _ = np_kto(logp, ref, desirable, kl_logp, kl_ref, 0.1, 1.0, 1.0)
  f32 = [a.astype(np.float32) for a in (logp, ref, desirable, kl_logp, kl_ref)]
  loss32, _ = kto_loss(*f32)
  np.testing.assert_allclose(loss32, want, rtol=1e-4, atol=1e-5)
  loss16, m16 = kto_loss(*(jnp.asarray(a, jnp.bfloat16) for a in f32))
  assert loss16.dtype == jnp.float32 and all(jnp.isfinite(v) for v in m16.values())
  np.testing.assert_allclose(loss16, want, atol=0.05)
  jitted = jax.jit(functools.partial(kto_loss, beta=0.1))(*f32)
  np.testing.assert_allclose(jitted[0], loss32, rtol=1e-6)
  check_grads(lambda p: kto_loss(p, ref, desirable, kl_logp, kl_ref)[0], (logp,), order=1,
              modes=["rev"], atol=1e-6, rtol=1e-5)
  grads = jax.grad(lambda *a: kto_loss(a[0], a[1], desirable, a[2], a[3])[0],
                   argnums=(0, 1, 2, 3))(logp, ref, kl_logp, kl_ref)
  assert np.any(np.asarray(grads[0]) != 0)
  for g in grads[1:]:  # reference and KL anchor are stop-gradient
    np.testing.assert_array_equal(g, 0.0)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, wd=st.floats(0.0, 3.0), wu=st.floats(0.0, 3.0))
def test_kto_loss_bounded_by_weights(seed, wd, wu):
  logp, ref, desirable, kl_logp, kl_ref = kto_inputs(seed)
  loss, m = kto_loss(logp.astype(np.float32), ref.astype(np.float32), desirable,
                     kl_logp.astype(np.float32), kl_ref.astype(np.float32),
                     desirable_weight=wd, undesirable_weight=wu)
  assert -1e-6 <= float(loss) <= max(wd, wu) + 1e-6
  assert float(m["kl"]) >= 0.0
  assert 0.0 <= float(m["desirable_fraction"]) <= 1.0


def test_kto_extreme_and_one_sided_batches_are_finite():
  big = np.array([1e4, -1e4, 1e4, -1e4, 0.0, 1e4], np.float32)
  for desirable in (np.ones(B, bool), np.zeros(B, bool), np.arange(B) % 2 == 0):
    (loss, m), g = jax.value_and_grad(
        lambda p: kto_loss(p, -big, desirable, big, -big), has_aux=True)(jnp.asarray(big))
    assert jnp.isfinite(loss) and bool(jnp.all(jnp.isfinite(g)))
    assert all(bool(jnp.isfinite(v)) for v in m.values())


def test_kto_bad_inputs():
  logp, ref, desirable, kl_logp, kl_ref = kto_inputs(0)
  with pytest.raises(ValueError, match="desirable"):
    kto_loss(logp, ref, desirable[:3], kl_logp, kl_ref)
  with pytest.raises(ValueError, match="ref_kl_logps"):
    kto_loss(logp, ref, desirable, kl_logp, kl_ref[:2])
  with pytest.raises(ValueError, match="beta"):
    kto_loss(logp, ref, desirable, kl_logp, kl_ref, beta=-1.0)
  with pytest.raises(ValueError, match="undesirable_weight"):
    kto_loss(logp, ref, desirable, kl_logp, kl_ref, undesirable_weight=-1.0)


# ----------------------------------- log1mexp ----------------------------------------------------


def test_log1mexp_accuracy_and_limits(x64):
  xs = np.array([-1e-12, -1e-6, -0.1, -0.6931, -0.7, -1.0, -5.0, -40.0, -800.0, -0.5, -3.0, 0.0])
  value_and_grad = jax.jit(jax.vmap(jax.value_and_grad(log1mexp)))
  y, g = value_and_grad(xs)
  want = [math.log(-math.expm1(x)) if x > -math.log(2) else math.log1p(-math.exp(x))
          for x in xs[:-1]]
  np.testing.assert_allclose(y[:-1], want, rtol=1e-12, atol=1e-300)
  # d/dx log(1 − eˣ) = −eˣ / (1 − eˣ)
  want_g = [-math.exp(x) / -math.expm1(x) for x in xs[1:-1]]
  np.testing.assert_allclose(g[1:-1], want_g, rtol=1e-9)
  # x = 0 (clipped to −eps) stays finite, with a finite gradient.
  assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(g)))
  np.testing.assert_allclose(y[-1], math.log(np.finfo(np.float64).eps), rtol=1e-9)


def test_log1mexp_float32_near_zero():
  x = jnp.array([0.0, -1e-30, -1e-3, -0.5, -3.0, -100.0], jnp.float32)
  y = log1mexp(x)
  g = jax.grad(lambda v: jnp.sum(log1mexp(v)))(x)
  assert bool(jnp.all(jnp.isfinite(y))) and bool(jnp.all(jnp.isfinite(g)))
  np.testing.assert_allclose(y[2:], [math.log(-math.expm1(v)) for v in (-1e-3, -0.5, -3.0, -100.0)],
                             rtol=1e-6, atol=1e-30)


# ----------------------------------- ORPO --------------------------------------------------------


@pytest.mark.parametrize("nll_kind", ["scalar", "per_sequence"])
def test_orpo_matches_numpy_reference(x64, nll_kind):
  for seed in (0, 1):
    ac, ar, nll = avg_inputs(seed)
    ac[0] = -1e-4  # near-certain chosen response: log1p(-exp(a)) must stay accurate
    nll_arg = nll if nll_kind == "per_sequence" else np.float64(nll.mean())
    loss, metrics = orpo_loss(ac, ar, nll_arg, beta=0.25)
    want, want_metrics = np_orpo(ac, ar, nll, 0.25)
    np.testing.assert_allclose(loss, want, atol=1e-6)
    assert_metrics(metrics, want_metrics)


def test_orpo_float32_bfloat16_jit_and_gradients(x64):
  ac, ar, nll = avg_inputs(2)
  want, _ = np_orpo(ac, ar, nll, 0.1)
  f32 = [a.astype(np.float32) for a in (ac, ar, nll)]
  loss32, _ = orpo_loss(*f32)
  np.testing.assert_allclose(loss32, want, rtol=1e-5, atol=1e-5)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in f32]
  loss16, _ = orpo_loss(*bf)
  want16, _ = np_orpo(*(np.asarray(a.astype(jnp.float32), np.float64) for a in bf), 0.1)
  np.testing.assert_allclose(loss16, want16, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(jax.jit(orpo_loss)(*f32)[0], loss32, rtol=1e-6)
  check_grads(lambda a, b, n: orpo_loss(a, b, n)[0], (ac, ar, nll), order=1, modes=["rev"],
              atol=1e-6, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=seeds)
def test_orpo_log_odds_antisymmetric(seed):
  ac, ar, nll = avg_inputs(seed, low=-8.0)
  _, m = orpo_loss(ac.astype(np.float32), ar.astype(np.float32), np.float32(1.0))
  _, m_swap = orpo_loss(ar.astype(np.float32), ac.astype(np.float32), np.float32(1.0))
  np.testing.assert_allclose(m_swap["log_odds_chosen"], -m["log_odds_chosen"], rtol=1e-5,
                             atol=1e-5)
  assert 0.0 <= float(m["reward_accuracy"]) <= 1.0
  # log σ(·) ≤ 0, so the loss is at least the NLL term.
  assert float(m["log_odds_ratio"]) <= 0.0


def test_orpo_extreme_values_are_finite():
  ac = jnp.array([0.0, -1e-9, -1e4, -1e-3, -1e4, 0.0], jnp.float32)
  ar = jnp.array([-1e4, 0.0, 0.0, -1e4, -1e4, 0.0], jnp.float32)
  (loss, m), grads = jax.value_and_grad(lambda a, b, n: orpo_loss(a, b, n), argnums=(0, 1, 2),
                                        has_aux=True)(ac, ar, jnp.float32(2.0))
  assert jnp.isfinite(loss) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  assert all(bool(jnp.isfinite(v)) for v in m.values())


def test_orpo_bad_inputs():
  ac, ar, nll = avg_inputs(0)
  with pytest.raises(ValueError, match="rejected_avg_logps"):
    orpo_loss(ac, ar[:2], nll)
  with pytest.raises(ValueError, match="chosen_nll"):
    orpo_loss(ac, ar, nll[:2])
  with pytest.raises(ValueError, match="beta"):
    orpo_loss(ac, ar, nll, beta=0.0)


# ----------------------------------- SimPO -------------------------------------------------------


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (2.5, 1.4), (1.0, 0.0), (2.0, -0.3)])
def test_simpo_matches_numpy_reference(x64, beta, gamma):
  ac, ar, _ = avg_inputs(3)
  loss, metrics = simpo_loss(ac, ar, beta=beta, gamma=gamma)
  want, want_metrics = np_simpo(ac, ar, beta, gamma)
  np.testing.assert_allclose(loss, want, atol=1e-6)
  assert_metrics(metrics, want_metrics)


def test_simpo_float32_bfloat16_jit_gradients_and_extremes(x64):
  ac, ar, _ = avg_inputs(4)
  want, _ = np_simpo(ac, ar, 2.0, 0.5)
  loss32, _ = simpo_loss(ac.astype(np.float32), ar.astype(np.float32))
  np.testing.assert_allclose(loss32, want, rtol=1e-5, atol=1e-6)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in (ac, ar)]
  want16, _ = np_simpo(*(np.asarray(a.astype(jnp.float32), np.float64) for a in bf), 2.0, 0.5)
  np.testing.assert_allclose(simpo_loss(*bf)[0], want16, rtol=1e-5, atol=1e-5)
  jitted = jax.jit(functools.partial(simpo_loss, beta=2.0, gamma=0.5))
  np.testing.assert_allclose(jitted(ac, ar)[0], simpo_loss(ac, ar)[0], rtol=1e-12)
  check_grads(lambda a, b: simpo_loss(a, b)[0], (ac, ar), order=1, modes=["rev"], atol=1e-6,
              rtol=1e-5)
  big = jnp.array([1e4, -1e4, 0.0, 1e4, -1e4, 0.0], jnp.float32)
  (loss, _), g = jax.value_and_grad(lambda a: simpo_loss(a, -a), has_aux=True)(big)
  assert jnp.isfinite(loss) and bool(jnp.all(jnp.isfinite(g)))


@settings(max_examples=20, deadline=None)
@given(seed=seeds, beta=st.floats(0.1, 5.0))
def test_simpo_swap_identity(seed, beta):
  """With γ = 0, softplus(−x) − softplus(x) = −x: L(c, r) − L(r, c) = −β·mean(a_c − a_r)."""
  ac, ar, _ = avg_inputs(seed)
  loss, m = simpo_loss(ac, ar, beta=beta, gamma=0.0)
  swapped, _ = simpo_loss(ar, ac, beta=beta, gamma=0.0)
  np.testing.assert_allclose(loss - swapped, -m["reward_margin"], rtol=1e-4, atol=1e-4)
  assert 0.0 <= float(m["reward_accuracy"]) <= 1.0


def test_simpo_bad_inputs():
  ac, ar, _ = avg_inputs(0)
  with pytest.raises(ValueError, match="rejected_avg_logps"):
    simpo_loss(ac, ar[:, None])
  with pytest.raises(ValueError, match="beta"):
    simpo_loss(ac, ar, beta=0.0)


# ----------------------------------- CPO ---------------------------------------------------------


@pytest.mark.parametrize("nll_kind", ["scalar", "per_sequence"])
@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.3])
def test_cpo_matches_numpy_reference(x64, nll_kind, alpha):
  rng = np.random.default_rng(5)
  c, r = rng.normal(-30.0, 5.0, B), rng.normal(-32.0, 5.0, B)
  nll = rng.uniform(0.5, 3.0, B)
  nll_arg = nll if nll_kind == "per_sequence" else np.float64(nll.mean())
  loss, metrics = cpo_loss(c, r, nll_arg, beta=0.2, alpha=alpha)
  want, want_metrics = np_cpo(c, r, nll, 0.2, alpha)
  np.testing.assert_allclose(loss, want, atol=1e-6)
  assert_metrics(metrics, want_metrics)


def test_cpo_float32_bfloat16_jit_gradients_and_extremes(x64):
  rng = np.random.default_rng(6)
  c, r, nll = rng.normal(-30.0, 5.0, B), rng.normal(-32.0, 5.0, B), rng.uniform(0.5, 3.0, B)
  want, _ = np_cpo(c, r, nll, 0.1, 1.0)
  f32 = [a.astype(np.float32) for a in (c, r, nll)]
  np.testing.assert_allclose(cpo_loss(*f32)[0], want, rtol=1e-5, atol=1e-5)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in f32]
  want16, _ = np_cpo(*(np.asarray(a.astype(jnp.float32), np.float64) for a in bf), 0.1, 1.0)
  np.testing.assert_allclose(cpo_loss(*bf)[0], want16, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(cpo_loss)(*f32)[0], cpo_loss(*f32)[0], rtol=1e-6)
  check_grads(lambda a, b, n: cpo_loss(a, b, n)[0], (c, r, nll), order=1, modes=["rev"],
              atol=1e-6, rtol=1e-5)
  big = jnp.array([1e4, -1e4, 0.0, 1e4, -1e4, 0.0], jnp.float32)
  (loss, _), g = jax.value_and_grad(lambda a: cpo_loss(a, -a, jnp.float32(1.0)), has_aux=True)(big)
  assert jnp.isfinite(loss) and bool(jnp.all(jnp.isfinite(g)))


@settings(max_examples=20, deadline=None)
@given(seed=seeds, alpha=st.floats(0.0, 2.0))
def test_cpo_is_reference_free_dpo_plus_nll(seed, alpha):
  rng = np.random.default_rng(seed)
  c, r = rng.normal(-30.0, 5.0, B), rng.normal(-32.0, 5.0, B)
  nll = np.float64(rng.uniform(0.5, 3.0))
  loss, _ = cpo_loss(c, r, nll, beta=0.1, alpha=alpha)
  zeros = np.zeros(B)
  dpo, _ = dpo_loss(c, r, zeros, zeros, beta=0.1)
  np.testing.assert_allclose(loss, dpo + alpha * nll, rtol=1e-5, atol=1e-5)


def test_cpo_bad_inputs():
  c = np.zeros(B)
  with pytest.raises(ValueError, match="rejected_logps"):
    cpo_loss(c, c[:2], 1.0)
  with pytest.raises(ValueError, match="chosen_nll"):
    cpo_loss(c, c, np.ones(3))
  with pytest.raises(ValueError, match="alpha"):
    cpo_loss(c, c, 1.0, alpha=-1.0)
