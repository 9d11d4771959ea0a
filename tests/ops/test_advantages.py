"""Tests for rljax.ops.advantages: group estimators, REINFORCE++, ReMax and reward shaping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.ops import advantages as eager

# Jitted entry points with static options: one compilation per dtype instead of one per primitive
# (eager dispatch compiles every op separately, which dominates the run time of tiny tests).
# `test_jit_matches_eager` checks the eager path against these.
grpo_advantages = jax.jit(
    eager.grpo_advantages, static_argnames=("group_size", "normalize_std", "eps")
)
rloo_advantages = jax.jit(eager.rloo_advantages, static_argnames=("group_size",))
grpo_process_advantages = jax.jit(
    eager.grpo_process_advantages, static_argnames=("group_size", "eps")
)
reinforce_pp_advantages = jax.jit(eager.reinforce_pp_advantages, static_argnames=("gamma",))
reinforce_pp_baseline_advantages = jax.jit(
    eager.reinforce_pp_baseline_advantages, static_argnames=("group_size",)
)
remax_advantages = jax.jit(eager.remax_advantages)
token_level_rewards = jax.jit(eager.token_level_rewards, static_argnames=("beta",))

G = 4  # group size
NUM_PROMPTS = 3
B = G * NUM_PROMPTS
T = 6


# ---------------------------------------------------------------- numpy references (float64)


def np_grpo(scores, group_size, normalize_std=True, eps=1e-6):
  out = np.zeros(len(scores))
  for start in range(0, len(scores), group_size):
    group = np.asarray(scores[start : start + group_size], np.float64)
    if np.all(group == group[0]):
      continue  # zero-variance group: advantage 0
    mean = sum(group) / group_size
    std = np.sqrt(sum((x - mean) ** 2 for x in group) / (group_size - 1))
    for j, x in enumerate(group):
      out[start + j] = (x - mean) / (std + eps) if normalize_std else x - mean
  return out


def np_rloo(scores, group_size):
  out = np.zeros(len(scores))
  for start in range(0, len(scores), group_size):
    group = list(np.asarray(scores[start : start + group_size], np.float64))
    for j, x in enumerate(group):
      others = group[:j] + group[j + 1 :]
      out[start + j] = x - sum(others) / len(others)
  return out


def np_process(step_rewards, step_mask, mask, group_size, eps=1e-6):
  batch, length = step_rewards.shape
  out = np.zeros((batch, length))
  for start in range(0, batch, group_size):
    rows = range(start, start + group_size)
    steps = [float(step_rewards[b, t]) for b in rows for t in range(length) if step_mask[b, t]]
    n = len(steps)
    if n == 0 or all(s == steps[0] for s in steps):
      continue
    mean = sum(steps) / n
    std = np.sqrt(sum((s - mean) ** 2 for s in steps) / (n - 1))
    for b in rows:
      for t in range(length):
        if mask[b, t]:
          out[b, t] = sum(
              (step_rewards[b, k] - mean) / (std + eps) for k in range(t, length) if step_mask[b, k]
          )
  return out


def np_masked_whiten(x, mask, eps=1e-8):
  vals = [x[b, t] for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
  n = len(vals)
  mean = sum(vals) / n
  var = sum((v - mean) ** 2 for v in vals) / (n - 1)
  return np.where(mask, (x - mean) / np.sqrt(var + eps), 0.0)


def np_return_to_go(rewards, mask, gamma):
  out = np.zeros(rewards.shape)
  for b in range(rewards.shape[0]):
    running = 0.0
    for t in reversed(range(rewards.shape[1])):
      if mask[b, t]:
        running = rewards[b, t] + gamma * running
        out[b, t] = running
  return out


def np_token_level_rewards(scores, mask, kl=None, beta=0.0):
  out = np.zeros(mask.shape)
  for b in range(mask.shape[0]):
    valid = np.flatnonzero(mask[b])
    if len(valid):
      out[b, valid[-1]] += scores[b]
    if kl is not None:
      for t in valid:
        out[b, t] -= beta * kl[b, t]
  return out


def make_mask(seed, batch=B):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, T + 1, size=batch)
  mask = np.arange(T)[None, :] < lengths[:, None]
  mask[0, 1] = False  # an interleaved non-policy token
  return mask


def make_scores(seed, batch=B):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=batch)
  scores[G : 2 * G] = 1.0  # a zero-variance group
  return scores


def make_steps(seed):
  """Step rewards at step ends (on valid tokens) and the response mask."""
  rng = np.random.default_rng(seed)
  mask = make_mask(seed)
  step_mask = (rng.random((B, T)) < 0.4) & mask
  step_mask[np.arange(B), mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)] = True  # last
  step_rewards = np.where(step_mask, rng.normal(size=(B, T)), rng.normal(size=(B, T)) * 100)
  return step_rewards, step_mask, mask


# ---------------------------------------------------------------- references, float64


@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_matches_numpy_reference(x64, normalize_std):
  scores = make_scores(0)
  out = grpo_advantages(jnp.asarray(scores), group_size=G, normalize_std=normalize_std)
  assert out.dtype == jnp.float64 and out.shape == (B,)
  np.testing.assert_allclose(out, np_grpo(scores, G, normalize_std), atol=1e-6)


def test_rloo_matches_numpy_reference(x64):
  scores = make_scores(1)
  out = rloo_advantages(jnp.asarray(scores), group_size=G)
  assert out.dtype == jnp.float64
  np.testing.assert_allclose(out, np_rloo(scores, G), atol=1e-6)


def test_grpo_process_matches_numpy_reference(x64):
  step_rewards, step_mask, mask = make_steps(2)
  step_rewards[G : 2 * G] = np.where(step_mask[G : 2 * G], 0.5, step_rewards[G : 2 * G])  # constant
  out = grpo_process_advantages(jnp.asarray(step_rewards), step_mask, mask, group_size=G)
  assert out.dtype == jnp.float64
  np.testing.assert_allclose(out, np_process(step_rewards, step_mask, mask, G), atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_matches_numpy_reference(x64, gamma):
  rng = np.random.default_rng(3)
  mask = make_mask(3)
  rewards = rng.normal(size=(B, T))
  out = reinforce_pp_advantages(jnp.asarray(rewards), mask, gamma=gamma)
  want = np_masked_whiten(np_return_to_go(rewards, mask, gamma), mask)
  np.testing.assert_allclose(out, want, atol=1e-6)


def test_reinforce_pp_baseline_matches_numpy_reference(x64):
  scores, mask = make_scores(4), make_mask(4)
  out = reinforce_pp_baseline_advantages(jnp.asarray(scores), mask, group_size=G)
  centred = np.array([scores[i] - np.mean(scores[i // G * G : i // G * G + G]) for i in range(B)])
  want = np_masked_whiten(np.where(mask, centred[:, None], 0.0), mask)
  np.testing.assert_allclose(out, want, atol=1e-6)


def test_remax_matches_numpy_reference(x64):
  rng = np.random.default_rng(5)
  mask = make_mask(5)
  rewards, baseline = rng.normal(size=(B, T)), rng.normal(size=B)
  out = remax_advantages(jnp.asarray(rewards), jnp.asarray(baseline), mask)
  want = np.where(mask, np_return_to_go(rewards, mask, 1.0) - baseline[:, None], 0.0)
  np.testing.assert_allclose(out, want, atol=1e-6)


def test_token_level_rewards_matches_numpy_reference(x64):
  rng = np.random.default_rng(6)
  mask = make_mask(6)
  mask[-1] = False  # a row with no valid token
  scores, kl = rng.normal(size=B), rng.normal(size=(B, T))
  out = token_level_rewards(jnp.asarray(scores), mask, kl=jnp.asarray(kl), beta=0.1)
  np.testing.assert_allclose(out, np_token_level_rewards(scores, mask, kl, 0.1), atol=1e-6)
  np.testing.assert_allclose(
      token_level_rewards(jnp.asarray(scores), mask),
      np_token_level_rewards(scores, mask),
      atol=1e-6,
  )
  assert np.all(np.asarray(out)[-1] == 0)


def test_hand_computed_values():
  out = rloo_advantages(jnp.array([1.0, 0.0, 0.0]), group_size=3)
  np.testing.assert_allclose(out, [1, -0.5, -0.5])
  # group [3, 1]: mean 2, unbiased std sqrt(2).
  out = grpo_advantages(jnp.array([3.0, 1.0]), group_size=2, eps=0.0)
  np.testing.assert_allclose(out, [1 / np.sqrt(2), -1 / np.sqrt(2)], rtol=1e-6)
  np.testing.assert_allclose(
      token_level_rewards(jnp.array([2.0]), jnp.array([[1, 1, 0, 1, 0]])), [[0, 0, 0, 2, 0]]
  )


# ---------------------------------------------------------------- float32 / bf16


def test_float32_and_bf16_inputs():
  scores, mask = make_scores(7).astype(np.float32), make_mask(7)
  for dtype, atol in [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)]:
    s = jnp.asarray(scores, dtype)
    s64 = np.asarray(s.astype(jnp.float32), np.float64)  # the rounded inputs
    out = grpo_advantages(s, group_size=G)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np_grpo(s64, G), atol=atol)
    np.testing.assert_allclose(rloo_advantages(s, group_size=G), np_rloo(s64, G), atol=atol)
    out = reinforce_pp_baseline_advantages(s, mask, group_size=G)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
    rewards = token_level_rewards(s, mask, kl=jnp.ones((B, T), dtype), beta=0.05)
    assert rewards.dtype == jnp.float32
    np.testing.assert_allclose(
        rewards, np_token_level_rewards(s64, mask, np.ones((B, T)), 0.05), atol=atol
    )
    adv = reinforce_pp_advantages(rewards.astype(dtype), mask, gamma=1.0)
    assert adv.dtype == jnp.float32 and np.all(np.isfinite(adv))
  step_rewards, step_mask, mask = make_steps(8)
  r16 = jnp.asarray(step_rewards, jnp.bfloat16)
  out = grpo_process_advantages(r16, step_mask, mask, group_size=G)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, np_process(step_rewards, step_mask, mask, G), atol=0.2)


# ---------------------------------------------------------------- gradients: constants


def test_no_gradient_flows_through_any_estimator():
  scores, mask = jnp.asarray(make_scores(9), jnp.float32), make_mask(9)
  rng = np.random.default_rng(9)
  rewards = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
  step_rewards, step_mask, _ = make_steps(9)
  objectives = {
      "grpo": (lambda s: jnp.sum(w[:, 0] * grpo_advantages(s, group_size=G)), scores),
      "drgrpo": (
          lambda s: jnp.sum(w[:, 0] * grpo_advantages(s, group_size=G, normalize_std=False)),
          scores,
      ),
      "rloo": (lambda s: jnp.sum(w[:, 0] * rloo_advantages(s, group_size=G)), scores),
      "process": (
          lambda r: jnp.sum(w * grpo_process_advantages(r, step_mask, mask, group_size=G)),
          jnp.asarray(step_rewards, jnp.float32),
      ),
      "rpp": (lambda r: jnp.sum(w * reinforce_pp_advantages(r, mask, gamma=0.9)), rewards),
      "rpp_baseline": (
          lambda s: jnp.sum(w * reinforce_pp_baseline_advantages(s, mask, group_size=G)), scores
      ),
      "remax_rewards": (lambda r: jnp.sum(w * remax_advantages(r, scores, mask)), rewards),
      "remax_baseline": (lambda b: jnp.sum(w * remax_advantages(rewards, b, mask)), scores),
      "shaping_scores": (
          lambda s: jnp.sum(w * token_level_rewards(s, mask, kl=rewards, beta=0.1)), scores
      ),
      "shaping_kl": (
          lambda k: jnp.sum(w * token_level_rewards(scores, mask, kl=k, beta=0.1)), rewards
      ),
  }
  for name, (f, x) in objectives.items():
    grad = np.asarray(jax.grad(f)(x))
    assert np.all(grad == 0), name


# ---------------------------------------------------------------- jit == eager


def test_jit_matches_eager():
  scores, mask = jnp.asarray(make_scores(10), jnp.float32), make_mask(10)
  step_rewards, step_mask, _ = make_steps(10)
  rewards = jnp.asarray(np.random.default_rng(10).normal(size=(B, T)), jnp.float32)
  calls = [
      (lambda s: eager.grpo_advantages(s, group_size=G), (scores,)),
      (lambda s: eager.rloo_advantages(s, group_size=G), (scores,)),
      (
          lambda r, sm, m: eager.grpo_process_advantages(r, sm, m, group_size=G),
          (step_rewards, step_mask, mask),
      ),
      (lambda r, m: eager.reinforce_pp_advantages(r, m, gamma=0.95), (rewards, mask)),
      (lambda s, m: eager.reinforce_pp_baseline_advantages(s, m, group_size=G), (scores, mask)),
      (eager.remax_advantages, (rewards, scores, mask)),
      (lambda s, m, k: eager.token_level_rewards(s, m, kl=k, beta=0.2), (scores, mask, rewards)),
  ]
  for f, args in calls:
    np.testing.assert_allclose(f(*args), jax.jit(f)(*args), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- properties (hypothesis)

_grpo = jax.jit(lambda s: grpo_advantages(s, group_size=G))
_drgrpo = jax.jit(lambda s: grpo_advantages(s, group_size=G, normalize_std=False))
_rloo = jax.jit(lambda s: rloo_advantages(s, group_size=G))
_process = jax.jit(lambda r, sm, m: grpo_process_advantages(r, sm, m, group_size=G))
group_scores = st.lists(st.floats(-100, 100, width=32), min_size=B, max_size=B)


@settings(max_examples=20, deadline=None)
@given(scores=group_scores)
def test_group_advantages_sum_to_zero_per_group(scores):
  s = jnp.asarray(scores, jnp.float32)
  for f in (_grpo, _drgrpo, _rloo):
    adv = np.asarray(f(s), np.float64).reshape(NUM_PROMPTS, G)
    scale = 1 + np.abs(np.asarray(scores)).reshape(NUM_PROMPTS, G).max(axis=1)
    assert np.all(np.abs(adv.sum(axis=1)) <= 1e-5 * scale)


@settings(max_examples=20, deadline=None)
@given(scores=group_scores)
def test_grpo_has_unit_unbiased_std_and_rloo_is_scaled_dr_grpo(scores):
  with jax.enable_x64(True):
    s = np.asarray(scores, np.float64)
    grouped = s.reshape(NUM_PROMPTS, G)
    adv = np.asarray(_grpo(s)).reshape(NUM_PROMPTS, G)
    for g in range(NUM_PROMPTS):
      std = grouped[g].std(ddof=1)
      if std > 1e-3:
        np.testing.assert_allclose(adv[g].std(ddof=1), std / (std + 1e-6), rtol=1e-9)
        np.testing.assert_allclose(adv[g].std(ddof=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(_rloo(s), G / (G - 1) * np.asarray(_drgrpo(s)), atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(value=st.floats(-1e6, 1e6, width=32), other=st.floats(-1e3, 1e3, width=32))
def test_zero_variance_group_gives_exactly_zero(value, other):
  scores = np.full(B, value, np.float32)
  scores[G:] = other  # every group constant
  for f in (_grpo, _drgrpo, _rloo):
    out = np.asarray(f(jnp.asarray(scores)))
    assert np.all(out == 0)
  mask = make_mask(0)
  out = np.asarray(reinforce_pp_baseline_advantages(jnp.asarray(scores), mask, group_size=G))
  assert np.all(out == 0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_process_advantage_is_a_suffix_sum_of_normalised_step_rewards(seed):
  with jax.enable_x64(True):
    step_rewards, step_mask, _ = make_steps(seed)
    full = np.ones((B, T), bool)
    adv = np.asarray(_process(step_rewards, step_mask, full))
    # A_t − A_{t+1} is the normalised reward of the step ending at t (0 elsewhere) ...
    increments = adv - np.concatenate([adv[:, 1:], np.zeros((B, 1))], axis=1)
    assert np.all(np.abs(increments[~step_mask]) < 1e-9)
    # ... and the normalised rewards of a group are standardised: sum 0, unbiased std ≈ 1.
    for g in range(NUM_PROMPTS):
      rows = slice(g * G, (g + 1) * G)
      normalised = increments[rows][step_mask[rows]]
      raw = step_rewards[rows][step_mask[rows]]
      assert abs(normalised.sum()) < 1e-9
      if raw.std(ddof=1) > 1e-3:
        np.testing.assert_allclose(normalised.std(ddof=1), 1.0, atol=1e-3)
      np.testing.assert_allclose(adv[rows, 0], increments[rows].sum(axis=1), atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_process_with_one_final_step_is_outcome_grpo(seed):
  """One step per completion, ending on its last token, is GRPO outcome supervision."""
  with jax.enable_x64(True):
    scores, mask = np.random.default_rng(seed).normal(size=B), make_mask(seed)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    step_mask = np.zeros((B, T), bool)
    step_mask[np.arange(B), last] = True
    step_rewards = np.where(step_mask, scores[:, None], 0.0)
    adv = np.asarray(_process(step_rewards, step_mask, mask))
    outcome = np.asarray(_grpo(scores))
    np.testing.assert_allclose(adv, np.where(mask, outcome[:, None], 0.0), atol=1e-9)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_reinforce_pp_is_whitened_over_valid_tokens(seed):
  with jax.enable_x64(True):
    rewards, mask = np.random.default_rng(seed).normal(size=(B, T)), make_mask(seed)
    adv = np.asarray(reinforce_pp_advantages(rewards, mask, gamma=1.0))
    assert abs(adv[mask].mean()) < 1e-9
    np.testing.assert_allclose(adv[mask].std(ddof=1), 1.0, atol=1e-6)
    assert np.all(adv[~mask] == 0)


# ---------------------------------------------------------------- degenerate inputs


def test_degenerate_inputs_are_finite():
  empty = np.zeros((B, T), bool)
  scores = jnp.asarray(make_scores(11), jnp.float32)
  rewards = jnp.full((B, T), 1e4, jnp.float32)
  outs = [
      grpo_process_advantages(rewards, empty, empty, group_size=G),
      reinforce_pp_advantages(rewards, empty, gamma=1.0),
      reinforce_pp_baseline_advantages(scores, empty, group_size=G),
      remax_advantages(rewards, scores, empty),
      token_level_rewards(scores, empty, kl=rewards, beta=0.1),
  ]
  for out in outs:
    assert np.all(np.asarray(out) == 0)
  # A single step in a group: its normalised reward is 0, not NaN; eps=0 stays finite too.
  step_mask = np.zeros((B, T), bool)
  step_mask[:, 0] = True
  step_mask[G, 0] = False  # group 1 keeps G-1 steps; group 0 has G; all-equal values below
  out = grpo_process_advantages(jnp.ones((B, T)), step_mask, np.ones((B, T)), group_size=G, eps=0.0)
  assert np.all(np.asarray(out) == 0)
  out = grpo_advantages(jnp.full((B,), 3.0), group_size=G, eps=0.0)
  assert np.all(np.asarray(out) == 0)
  grad = jax.grad(lambda s: jnp.sum(grpo_advantages(s, group_size=G, eps=0.0)))(jnp.ones((B,)))
  assert np.all(np.isfinite(grad))


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_errors_naming_the_argument():
  scores, mask = jnp.zeros((B,)), jnp.ones((B, T))
  for f in (
      lambda gs: eager.grpo_advantages(scores, group_size=gs),
      lambda gs: eager.rloo_advantages(scores, group_size=gs),
      lambda gs: eager.reinforce_pp_baseline_advantages(scores, mask, group_size=gs),
      lambda gs: eager.grpo_process_advantages(mask, mask, mask, group_size=gs),
  ):
    for bad in (1, 5, 0, 2.0):  # singleton, B % 5 != 0, zero, not an int
      with pytest.raises(ValueError, match="group_size"):
        f(bad)
  with pytest.raises(ValueError, match="scores"):
    eager.grpo_advantages(jnp.zeros((B, 1)), group_size=G)
  with pytest.raises(ValueError, match="eps"):
    eager.grpo_advantages(scores, group_size=G, eps=-1.0)
  with pytest.raises(ValueError, match="step_mask"):
    eager.grpo_process_advantages(mask, jnp.ones((B, T + 1)), mask, group_size=G)
  with pytest.raises(ValueError, match="scores"):
    eager.reinforce_pp_baseline_advantages(scores, jnp.ones((2 * B, T)), group_size=G)
  with pytest.raises(ValueError, match="gamma"):
    eager.reinforce_pp_advantages(mask, mask, gamma=1.1)
  with pytest.raises(ValueError, match="baseline_scores"):
    eager.remax_advantages(mask, jnp.zeros((B + 1,)), mask)
  with pytest.raises(ValueError, match="mask"):
    eager.remax_advantages(mask, scores, jnp.ones((B, T - 1)))
  with pytest.raises(ValueError, match="kl"):
    eager.token_level_rewards(scores, mask, beta=0.1)
  with pytest.raises(ValueError, match="kl"):
    eager.token_level_rewards(scores, mask, kl=jnp.zeros((B, T + 1)), beta=0.1)
  with pytest.raises(ValueError, match="scores"):
    eager.token_level_rewards(jnp.zeros((B + 1,)), mask)
