"""Tests for rljax.losses.reward_model against float64 numpy references."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from rljax.losses.reward_model import listwise_reward_loss, reward_model_loss

B, K = 6, 4
seeds = st.integers(0, 2**31 - 1)


def logsig(x):
  return -np.logaddexp(0.0, -x)


def np_reward_model(rc, rr, margin=None, center_coef=None):
  """TRL RewardTrainer.compute_loss: −logσ(r_c − r_r − m).mean() + c·mean((r_c + r_r)²)."""
  m = np.zeros(len(rc)) if margin is None else np.broadcast_to(margin, (len(rc),))
  loss = np.mean([-logsig(rc[i] - rr[i] - m[i]) for i in range(len(rc))])
  if center_coef is not None:
    loss += center_coef * np.mean([(rc[i] + rr[i]) ** 2 for i in range(len(rc))])
  metrics = {"rewards_chosen": np.mean(rc), "rewards_rejected": np.mean(rr),
             "reward_margin": np.mean(rc - rr), "reward_accuracy": np.mean(rc > rr)}
  return loss, metrics


def np_listwise(rewards):
  """InstructGPT eq. 1: −1/C(K,2)·E[Σ_{i<j} log σ(r_i − r_j)], rows ranked best first."""
  per_row, correct, margins = [], [], []
  for row in rewards:
    k = len(row)
    terms = []
    for i in range(k):
      for j in range(i + 1, k):
        terms.append(-logsig(row[i] - row[j]))
        correct.append(float(row[i] > row[j]))
        margins.append(row[i] - row[j])
    assert len(terms) == math.comb(k, 2)
    per_row.append(sum(terms) / math.comb(k, 2))
  return np.mean(per_row), {"reward_accuracy": np.mean(correct), "reward_margin": np.mean(margins)}


def pair_inputs(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return rng.normal(0.5, 2.0, B) * scale, rng.normal(-0.5, 2.0, B) * scale, rng.uniform(0, 2, B)


MARGIN_CASES = [("none", None), ("scalar", None), ("per_pair", None), ("none", 0.01),
                ("per_pair", 0.1)]


@pytest.mark.parametrize("margin_kind,center_coef", MARGIN_CASES)
def test_reward_model_matches_numpy_reference(x64, margin_kind, center_coef):
  rc, rr, m = pair_inputs(0)
  margin = {"none": None, "scalar": 0.7, "per_pair": m}[margin_kind]
  loss, metrics = reward_model_loss(rc, rr, margin=margin, center_coef=center_coef)
  want, want_metrics = np_reward_model(rc, rr, margin, center_coef)
  assert loss.dtype == jnp.float64
  np.testing.assert_allclose(loss, want, atol=1e-6)
  assert set(metrics) == set(want_metrics)
  for name, value in want_metrics.items():
    np.testing.assert_allclose(metrics[name], value, atol=1e-6, err_msg=name)


def test_reward_model_float32_bfloat16_jit_and_gradients(x64):
  rc, rr, m = pair_inputs(1)
  want, _ = np_reward_model(rc, rr, m, 0.01)
  f32 = [a.astype(np.float32) for a in (rc, rr, m)]
  loss32, _ = reward_model_loss(f32[0], f32[1], margin=f32[2], center_coef=0.01)
  np.testing.assert_allclose(loss32, want, rtol=1e-5, atol=1e-6)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in f32]
  loss16, _ = reward_model_loss(bf[0], bf[1], margin=bf[2], center_coef=0.01)
  want16, _ = np_reward_model(*(np.asarray(a.astype(jnp.float32), np.float64) for a in bf), 0.01)
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, want16, rtol=1e-5, atol=1e-5)
  jitted = jax.jit(lambda a, b, c: reward_model_loss(a, b, margin=c, center_coef=0.01))
  np.testing.assert_allclose(jitted(*f32)[0], loss32, rtol=1e-6)
  check_grads(lambda a, b: reward_model_loss(a, b, margin=m, center_coef=0.01)[0], (rc, rr),
              order=1, modes=["rev"], atol=1e-6, rtol=1e-5)
  g_margin = jax.grad(lambda c: reward_model_loss(rc, rr, margin=c)[0])(m)
  np.testing.assert_array_equal(g_margin, 0.0)  # the margin is data


@settings(max_examples=20, deadline=None)
@given(seed=seeds, shift=st.floats(-50.0, 50.0))
def test_reward_model_properties(seed, shift):
  rc, rr, _ = pair_inputs(seed)
  loss, m = reward_model_loss(rc, rr)
  assert 0.0 <= float(m["reward_accuracy"]) <= 1.0
  # Bradley–Terry depends on reward differences only (without the centring term).
  shifted, _ = reward_model_loss(rc + shift, rr + shift)
  np.testing.assert_allclose(shifted, loss, rtol=1e-5, atol=1e-5)
  # Swapping chosen and rejected: softplus(x) − softplus(−x) = x.
  swapped, _ = reward_model_loss(rr, rc)
  np.testing.assert_allclose(swapped - loss, m["reward_margin"], rtol=1e-4, atol=1e-4)


def test_reward_model_extreme_values_are_finite():
  big = jnp.array([1e4, -1e4, 1e4, -1e4, 0.0, 1e4], jnp.float32)
  (loss, m), grads = jax.value_and_grad(
      lambda a, b: reward_model_loss(a, b, center_coef=1e-3), argnums=(0, 1), has_aux=True
  )(big, -big)
  assert jnp.isfinite(loss) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  assert all(bool(jnp.isfinite(v)) for v in m.values())


def test_reward_model_bad_inputs():
  rc, rr, m = pair_inputs(0)
  with pytest.raises(ValueError, match="rejected_rewards"):
    reward_model_loss(rc, rr[:3])
  with pytest.raises(ValueError, match="margin"):
    reward_model_loss(rc, rr, margin=m[:2])
  with pytest.raises(ValueError, match="center_coef"):
    reward_model_loss(rc, rr, center_coef=-1.0)
  with pytest.raises(ValueError, match="chosen_rewards"):
    reward_model_loss(rc[:, None], rr[:, None])


# ----------------------------------- listwise ---------------------------------------------------


def ranked_inputs(seed, k=K):
  rng = np.random.default_rng(seed)
  return rng.normal(0.0, 2.0, (B, k)) - 0.3 * np.arange(k)


@pytest.mark.parametrize("k", [2, 3, K])
def test_listwise_matches_numpy_reference(x64, k):
  rewards = ranked_inputs(k, k)
  loss, metrics = listwise_reward_loss(rewards)
  want, want_metrics = np_listwise(rewards)
  np.testing.assert_allclose(loss, want, atol=1e-6)
  for name, value in want_metrics.items():
    np.testing.assert_allclose(metrics[name], value, atol=1e-6, err_msg=name)


def test_listwise_float32_bfloat16_jit_and_gradients(x64):
  rewards = ranked_inputs(1)
  want, _ = np_listwise(rewards)
  loss32, _ = listwise_reward_loss(rewards.astype(np.float32))
  np.testing.assert_allclose(loss32, want, rtol=1e-5, atol=1e-6)
  bf = jnp.asarray(rewards, jnp.bfloat16)
  want16, _ = np_listwise(np.asarray(bf.astype(jnp.float32), np.float64))
  np.testing.assert_allclose(listwise_reward_loss(bf)[0], want16, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(listwise_reward_loss)(rewards)[0],
                             listwise_reward_loss(rewards)[0], rtol=1e-12)
  check_grads(lambda r: listwise_reward_loss(r)[0], (rewards,), order=1, modes=["rev"],
              atol=1e-6, rtol=1e-5)
  big = jnp.asarray(np.where(np.arange(K) % 2 == 0, 1e4, -1e4) * np.ones((B, 1)), jnp.float32)
  (loss, _), g = jax.value_and_grad(listwise_reward_loss, has_aux=True)(big)
  assert jnp.isfinite(loss) and bool(jnp.all(jnp.isfinite(g)))


@settings(max_examples=20, deadline=None)
@given(seed=seeds)
def test_listwise_with_two_responses_equals_pairwise(seed):
  rewards = ranked_inputs(seed, 2)
  loss, m = listwise_reward_loss(rewards)
  pair_loss, pair_m = reward_model_loss(rewards[:, 0], rewards[:, 1])
  np.testing.assert_allclose(loss, pair_loss, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(m["reward_accuracy"], pair_m["reward_accuracy"])
  np.testing.assert_allclose(m["reward_margin"], pair_m["reward_margin"], rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, shift=st.floats(-50.0, 50.0))
def test_listwise_properties(seed, shift):
  rewards = ranked_inputs(seed)
  loss, m = listwise_reward_loss(rewards)
  assert 0.0 <= float(m["reward_accuracy"]) <= 1.0
  # Invariant to a per-prompt shift of all K rewards.
  shifts = shift * np.linspace(-1.0, 1.0, B)[:, None]
  np.testing.assert_allclose(listwise_reward_loss(rewards + shifts)[0], loss, rtol=1e-5, atol=1e-5)
  # A correctly sorted list scores better than the same rewards in reverse order.
  ordered = -np.sort(-rewards, axis=1)
  assert float(listwise_reward_loss(ordered)[0]) <= float(listwise_reward_loss(ordered[:, ::-1])[0])


def test_listwise_bad_inputs():
  with pytest.raises(ValueError, match="rewards"):
    listwise_reward_loss(np.zeros((B, 1)))
  with pytest.raises(ValueError, match="rewards"):
    listwise_reward_loss(np.zeros(B))


def test_pairs_cover_all_k_choose_2():
  from rljax.losses.reward_model import _ranked_pairs

  better, worse = _ranked_pairs(5)
  assert list(zip(better, worse)) == list(itertools.combinations(range(5), 2))
