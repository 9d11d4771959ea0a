"""Tests for rljax.losses.dpo: every variant against a float64 numpy transcription of its loss."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rljax.losses.dpo import DPO_VARIANTS, dpo_loss

B = 6
BETA = 0.3

# --------------------------------------------------------------------------------------------
# Independent numpy reference: per-pair formulas transcribed from the papers / TRL 1.16
# (cDPO label smoothing for `sigmoid`), one pair at a time, in float64.
# --------------------------------------------------------------------------------------------


def np_logsig(x):
  return -np.logaddexp(0.0, -x)


def np_sig(x):
  return 1.0 / (1.0 + math.exp(-x))


def np_pair_loss(variant, pc, pr, rc, rr, *, beta, eps, lc, lr, tau, delta):
  sc, sr = pc - rc, pr - rr  # log-ratios
  d = sc - sr
  x = beta * d
  if variant == "sigmoid":
    return -(1 - eps) * np_logsig(x) - eps * np_logsig(-x)
  if variant == "robust":
    return (-(1 - eps) * np_logsig(x) + eps * np_logsig(-x)) / (1 - 2 * eps)
  if variant == "hinge":
    return max(0.0, 1 - x)
  if variant == "ipo":
    if lc is not None:
      d = sc / max(lc, 1) - sr / max(lr, 1)
    return (d - 1 / (2 * beta)) ** 2
  if variant == "exo_pair":
    e = eps if eps > 0 else 1e-3
    qw, ql = np_sig(x), np_sig(-x)
    return qw * (math.log(qw) - math.log(1 - e)) + ql * (math.log(ql) - math.log(e))
  if variant == "nca_pair":
    a, b = beta * sc, beta * sr
    return -np_logsig(a) - 0.5 * np_logsig(-a) - 0.5 * np_logsig(-b)
  if variant == "bco_pair":
    a, b = beta * sc, beta * sr
    return -np_logsig(a - delta) - np_logsig(-(b - delta))
  if variant == "sppo_hard":
    return (sc - 0.5 / beta) ** 2 + (sr + 0.5 / beta) ** 2
  if variant == "apo_zero":
    return (1 - np_sig(beta * sc)) + np_sig(beta * sr)
  if variant == "apo_down":
    return np_sig(beta * sc) + (1 - np_sig(x))
  if variant == "discopop":
    m = np_sig(x / tau)
    return -np_logsig(x) * (1 - m) + math.exp(-x) * m
  if variant == "sigmoid_norm":
    return -np_logsig(beta * (sc / max(lc, 1) - sr / max(lr, 1)))
  raise AssertionError(variant)


def np_dpo(pc, pr, rc, rr, *, beta=BETA, variant="sigmoid", eps=0.0, lc=None, lr=None, tau=0.05,
           delta=0.0):
  losses, rew_c, rew_r, correct = [], [], [], []
  for i in range(len(pc)):
    li = None if lc is None else float(lc[i])
    ri = None if lr is None else float(lr[i])
    losses.append(np_pair_loss(variant, float(pc[i]), float(pr[i]), float(rc[i]), float(rr[i]),
                               beta=beta, eps=eps, lc=li, lr=ri, tau=tau, delta=delta))
    rew_c.append(beta * (pc[i] - rc[i]))
    rew_r.append(beta * (pr[i] - rr[i]))
    correct.append(1.0 if rew_c[-1] > rew_r[-1] else 0.0)
  metrics = {
      "rewards_chosen": np.mean(rew_c),
      "rewards_rejected": np.mean(rew_r),
      "reward_margin": np.mean(np.array(rew_c) - np.array(rew_r)),
      "reward_accuracy": np.mean(correct),
  }
  return np.mean(losses), metrics


def make_inputs(seed, dtype=np.float64, scale=1.0):
  rng = np.random.default_rng(seed)
  pc = rng.normal(-20.0, 4.0, B) * scale
  pr = rng.normal(-22.0, 4.0, B) * scale
  rc = pc + rng.normal(0.0, 1.5, B) * scale
  rr = pr + rng.normal(0.0, 1.5, B) * scale
  lc = rng.integers(1, 30, B).astype(np.float64)
  lr = rng.integers(0, 30, B).astype(np.float64)  # a 0 length is clamped to 1, as in TRL
  lr[0] = 0.0
  return [a.astype(dtype) for a in (pc, pr, rc, rr)], lc, lr


# Extra keyword arguments that exercise each variant's options.
VARIANT_CASES = [
    ("sigmoid", {}),
    ("sigmoid", {"label_smoothing": 0.1}),
    ("robust", {}),
    ("robust", {"label_smoothing": 0.2}),
    ("hinge", {}),
    ("ipo", {}),
    ("ipo", {"lengths": True}),
    ("exo_pair", {}),
    ("exo_pair", {"label_smoothing": 0.05}),
    ("nca_pair", {}),
    ("bco_pair", {}),
    ("bco_pair", {"bco_delta": 0.4}),
    ("sppo_hard", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("discopop", {}),
    ("discopop", {"discopop_tau": 0.5}),
    ("sigmoid_norm", {"lengths": True}),
]
CASE_IDS = [
    f"{v}-{'-'.join(f'{k}={x}' for k, x in kw.items()) or 'default'}" for v, kw in VARIANT_CASES
]


def call_kwargs(variant, kw, lc, lr):
  out = {"beta": BETA, "variant": variant}
  if kw.get("lengths"):
    out["chosen_lengths"], out["rejected_lengths"] = lc, lr
  for key in ("label_smoothing", "bco_delta", "discopop_tau"):
    if key in kw:
      out[key] = kw[key]
  return out


def ref_kwargs(variant, kw, lc, lr):
  return {
      "beta": BETA,
      "variant": variant,
      "eps": kw.get("label_smoothing", 0.0),
      "lc": lc if kw.get("lengths") else None,
      "lr": lr if kw.get("lengths") else None,
      "tau": kw.get("discopop_tau", 0.05),
      "delta": kw.get("bco_delta", 0.0),
  }


def test_every_variant_has_a_case():
  assert {v for v, _ in VARIANT_CASES} == set(DPO_VARIANTS)


# Eager (loss, metrics), grads: eager primitives are compiled once per shape and dtype and shared
# by all variants, which keeps this file fast; `test_jit_matches_eager` covers the jitted path.
loss_and_grads = jax.value_and_grad(dpo_loss, argnums=(0, 1, 2, 3), has_aux=True)


@pytest.mark.parametrize("variant,kw", VARIANT_CASES, ids=CASE_IDS)
def test_matches_numpy_reference_float64(x64, variant, kw):
  for seed in (0, 1):
    (pc, pr, rc, rr), lc, lr = make_inputs(seed)
    (loss, metrics), grads = loss_and_grads(pc, pr, rc, rr, **call_kwargs(variant, kw, lc, lr))
    want, want_metrics = np_dpo(pc, pr, rc, rr, **ref_kwargs(variant, kw, lc, lr))
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(loss, want, atol=1e-6, rtol=1e-9)
    assert set(metrics) == set(want_metrics)
    for name, value in want_metrics.items():
      np.testing.assert_allclose(metrics[name], value, atol=1e-6, err_msg=name)
    # Reference log-probs are stop-gradient; the policy does get a gradient.
    np.testing.assert_array_equal(grads[2], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)
    assert np.any(np.asarray(grads[0]) != 0)


@pytest.mark.parametrize("variant,kw", VARIANT_CASES, ids=CASE_IDS)
def test_float32_and_bfloat16(variant, kw):
  (pc, pr, rc, rr), lc, lr = make_inputs(3)
  kwargs = call_kwargs(variant, kw, lc, lr)
  ref = functools.partial(np_dpo, **ref_kwargs(variant, kw, lc, lr))
  f32 = [a.astype(np.float32) for a in (pc, pr, rc, rr)]
  (loss32, _), _ = loss_and_grads(*f32, **kwargs)
  assert loss32.dtype == jnp.float32
  np.testing.assert_allclose(loss32, ref(*(a.astype(np.float64) for a in f32))[0], rtol=2e-4,
                             atol=2e-4)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in (pc, pr, rc, rr)]
  (loss16, metrics16), grads16 = loss_and_grads(*bf, **kwargs)
  assert loss16.dtype == jnp.float32  # computed in float32
  assert all(jnp.isfinite(v) for v in metrics16.values())
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads16)
  # Against the reference on the bf16-rounded values: only the float32 arithmetic differs.
  want = ref(*(np.asarray(a.astype(jnp.float32), np.float64) for a in bf))[0]
  np.testing.assert_allclose(loss16, want, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("variant,kw", VARIANT_CASES, ids=CASE_IDS)
def test_gradients(x64, variant, kw):
  (pc, pr, rc, rr), lc, lr = make_inputs(5)
  kwargs = call_kwargs(variant, kw, lc, lr)

  def f(pc, pr):
    return dpo_loss(pc, pr, rc, rr, **kwargs)[0]

  check_grads(f, (pc, pr), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant,kw", VARIANT_CASES, ids=CASE_IDS)
def test_jit_matches_eager(variant, kw):
  (pc, pr, rc, rr), lc, lr = make_inputs(7, np.float32)
  kwargs = call_kwargs(variant, kw, lc, lr)
  eager_loss, eager_metrics = dpo_loss(pc, pr, rc, rr, **kwargs)
  jit_loss, jit_metrics = jax.jit(functools.partial(dpo_loss, **kwargs))(pc, pr, rc, rr)
  np.testing.assert_allclose(jit_loss, eager_loss, rtol=1e-6, atol=1e-6)
  for name in eager_metrics:
    np.testing.assert_allclose(jit_metrics[name], eager_metrics[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant,kw", VARIANT_CASES, ids=CASE_IDS)
def test_extreme_log_probs_are_finite(variant, kw):
  _, lc, lr = make_inputs(8)
  kwargs = call_kwargs(variant, kw, lc, lr)
  big = np.array([1e4, -1e4, 1e4, -1e4, 0.0, -1e4], np.float32)
  zeros = np.zeros(B, np.float32)
  cases = [
      (big, -big, zeros, zeros),  # δ = ±2e4
      (-big, big, big, -big),  # δ = ∓4e4, the other way
      (np.full(B, -1e4, np.float32),) * 4,  # δ = 0 at huge magnitude
  ]
  for args in cases:
    (loss, metrics), grads = loss_and_grads(*args, **kwargs)
    assert jnp.isfinite(loss), (variant, loss)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert all(bool(jnp.isfinite(v)) for v in metrics.values())


# ----------------------------------- properties -----------------------------------------------

seeds = st.integers(0, 2**31 - 1)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, eps=st.floats(0.0, 1.0))
def test_cdpo_symmetric_under_swap_with_flipped_smoothing(seed, eps):
  """Swapping chosen/rejected and ε → 1 − ε leaves the cDPO loss unchanged."""
  (pc, pr, rc, rr), _, _ = make_inputs(seed, np.float32)
  loss, _ = dpo_loss(pc, pr, rc, rr, beta=BETA, label_smoothing=eps)
  swapped, _ = dpo_loss(pr, pc, rr, rc, beta=BETA, label_smoothing=1.0 - eps)
  np.testing.assert_allclose(loss, swapped, rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=seeds)
def test_dpo_swap_equals_negated_margin(seed):
  """For ε = 0, swapping chosen and rejected equals evaluating the loss at −δ.

  Negating every log-prob negates both log-ratios and hence δ; and since
  softplus(x) − softplus(−x) = x, the two losses differ by exactly β·mean(δ).
  """
  (pc, pr, rc, rr), _, _ = make_inputs(seed, np.float64)
  loss, m = dpo_loss(pc, pr, rc, rr, beta=BETA)
  swapped, m_swap = dpo_loss(pr, pc, rr, rc, beta=BETA)
  negated, _ = dpo_loss(-pc, -pr, -rc, -rr, beta=BETA)
  np.testing.assert_allclose(swapped, negated, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(swapped - loss, m["reward_margin"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(m_swap["reward_margin"], -m["reward_margin"], rtol=1e-5, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, scale=st.floats(0.01, 100.0))
def test_reward_accuracy_in_unit_interval(seed, scale):
  (pc, pr, rc, rr), _, _ = make_inputs(seed, np.float32, scale=scale)
  _, m = dpo_loss(pc, pr, rc, rr, beta=BETA)
  assert 0.0 <= float(m["reward_accuracy"]) <= 1.0
  assert float(m["reward_accuracy"]) * B == pytest.approx(round(float(m["reward_accuracy"]) * B))


@settings(max_examples=20, deadline=None)
@given(seed=seeds)
def test_variant_special_cases(seed):
  """Relations between variants that hold by their formulas."""
  (pc, pr, rc, rr), lc, lr = make_inputs(seed, np.float32)
  base = dpo_loss(pc, pr, rc, rr, beta=BETA)[0]
  ones = np.ones(B, np.float32)
  # Robust DPO with ε = 0 is DPO.
  np.testing.assert_allclose(dpo_loss(pc, pr, rc, rr, beta=BETA, variant="robust")[0], base,
                             rtol=1e-6)
  # sigmoid_norm with unit lengths is DPO; IPO with unit lengths is IPO on sums.
  np.testing.assert_allclose(
      dpo_loss(pc, pr, rc, rr, beta=BETA, variant="sigmoid_norm", chosen_lengths=ones,
               rejected_lengths=ones)[0], base, rtol=1e-6)
  np.testing.assert_allclose(
      dpo_loss(pc, pr, rc, rr, beta=BETA, variant="ipo", chosen_lengths=ones,
               rejected_lengths=ones)[0],
      dpo_loss(pc, pr, rc, rr, beta=BETA, variant="ipo")[0], rtol=1e-6)
  # exo_pair with ε = 0 uses the EXO paper's 1e-3.
  np.testing.assert_allclose(
      dpo_loss(pc, pr, rc, rr, beta=BETA, variant="exo_pair")[0],
      dpo_loss(pc, pr, rc, rr, beta=BETA, variant="exo_pair", label_smoothing=1e-3)[0], rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(seed=seeds)
def test_monotone_variants_decrease_as_the_chosen_response_gains_probability(seed):
  """Variants whose per-pair loss is non-increasing in s_c by their formula.

  (exo_pair, nca_pair and discopop are not: they have an interior minimum or are non-convex.)
  """
  (pc, pr, rc, rr), _, _ = make_inputs(seed, np.float32)
  for variant in ("sigmoid", "robust", "hinge", "apo_zero", "bco_pair"):
    losses = [float(dpo_loss(pc + t, pr, rc, rr, beta=BETA, variant=variant)[0])
              for t in (-3.0, 0.0, 3.0)]
    assert losses[0] >= losses[1] >= losses[2], (variant, losses)


# ----------------------------------- bad input -------------------------------------------------


def test_unknown_variant_lists_valid_ones():
  (pc, pr, rc, rr), _, _ = make_inputs(0, np.float32)
  with pytest.raises(ValueError, match="variant") as info:
    dpo_loss(pc, pr, rc, rr, variant="dpo")
  for name in DPO_VARIANTS:
    assert repr(name) in str(info.value)


def test_sigmoid_norm_requires_lengths():
  (pc, pr, rc, rr), lc, lr = make_inputs(0, np.float32)
  with pytest.raises(ValueError, match="chosen_lengths"):
    dpo_loss(pc, pr, rc, rr, variant="sigmoid_norm")
  with pytest.raises(ValueError, match="rejected_lengths"):
    dpo_loss(pc, pr, rc, rr, variant="sigmoid_norm", chosen_lengths=lc)
  with pytest.raises(ValueError, match="chosen_lengths"):
    dpo_loss(pc, pr, rc, rr, variant="ipo", rejected_lengths=lr)
  with pytest.raises(ValueError, match="rejected_lengths"):
    dpo_loss(pc, pr, rc, rr, variant="ipo", chosen_lengths=lc, rejected_lengths=lr[:3])


def test_shape_and_option_errors():
  (pc, pr, rc, rr), _, _ = make_inputs(0, np.float32)
  with pytest.raises(ValueError, match="ref_rejected"):
    dpo_loss(pc, pr, rc, rr[:4])
  with pytest.raises(ValueError, match="policy_chosen"):
    dpo_loss(pc[:, None], pr, rc, rr)
  with pytest.raises(ValueError, match="beta"):
    dpo_loss(pc, pr, rc, rr, beta=0.0)
  with pytest.raises(ValueError, match="label_smoothing"):
    dpo_loss(pc, pr, rc, rr, variant="robust", label_smoothing=0.5)
  with pytest.raises(ValueError, match="label_smoothing"):
    dpo_loss(pc, pr, rc, rr, label_smoothing=-0.1)
  with pytest.raises(ValueError, match="label_smoothing"):
    dpo_loss(pc, pr, rc, rr, variant="exo_pair", label_smoothing=1.0)
  with pytest.raises(ValueError, match="discopop_tau"):
    dpo_loss(pc, pr, rc, rr, variant="discopop", discopop_tau=0.0)
  with pytest.raises(ValueError, match="bco_delta"):
    dpo_loss(pc, pr, rc, rr, variant="bco_pair", bco_delta=np.zeros(B))
