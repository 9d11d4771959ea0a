"""KL controllers against plain-Python transcriptions of verl's / the PPO paper's update rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.ops.kl_control import (
    KLControllerState,
    adaptive_kl_controller,
    fixed_kl_controller,
    ppo_kl_controller,
)

STEPS = 12


# ---- references (transcriptions of verl's AdaptiveKLController and PPO paper sec. 4) ----


def np_adaptive(init_coef, target, horizon, kls, n_steps):
  value, out = float(init_coef), []
  for kl, n in zip(kls, n_steps):
    proportional_error = np.clip(kl / target - 1, -0.2, 0.2)
    value *= 1 + proportional_error * n / horizon
    out.append(value)
  return np.array(out)


def np_ppo(init_beta, target, kls):
  beta, out = float(init_beta), []
  for kl in kls:
    if kl < target / 1.5:
      beta = beta / 2
    elif kl > target * 1.5:
      beta = beta * 2
    out.append(beta)
  return np.array(out)


def _run(ctrl, kls, n_steps, *, jit=False):
  update = jax.jit(ctrl.update) if jit else ctrl.update
  state, out = ctrl.init(), []
  for kl, n in zip(kls, n_steps):
    state = update(state, kl, n)
    assert state.coef.dtype == jnp.float32 and state.coef.shape == ()
    out.append(float(state.coef))
  return np.array(out)


def _sequence(seed=0, target=6.0):
  rng = np.random.default_rng(seed)
  kls = target * rng.uniform(0.0, 2.5, size=STEPS)
  n_steps = rng.integers(1, 1024, size=STEPS)
  return kls, n_steps


# ---- fixed ----


def test_fixed_controller_keeps_its_coefficient():
  ctrl = fixed_kl_controller(0.05)
  state = ctrl.init()
  assert isinstance(state, KLControllerState) and state.coef.dtype == jnp.float32
  kls, n_steps = _sequence(1)
  constant = np.full(STEPS, np.float32(0.05))
  np.testing.assert_array_equal(_run(ctrl, kls, n_steps), constant)
  np.testing.assert_array_equal(_run(ctrl, kls, n_steps, jit=True), constant)
  assert float(ctrl.update(state, 1.0).coef) == np.float32(0.05)  # n_steps optional


# ---- adaptive ----


@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_controller_matches_reference(seed):
  kls, n_steps = _sequence(seed)
  ctrl = adaptive_kl_controller(0.2, target=6.0, horizon=1000)
  expected = np_adaptive(0.2, 6.0, 1000, kls, n_steps)
  np.testing.assert_allclose(_run(ctrl, kls, n_steps), expected, rtol=1e-5)
  np.testing.assert_allclose(_run(ctrl, kls, n_steps, jit=True), expected, rtol=1e-5)


def test_adaptive_controller_under_x64_keeps_float32_state(x64):
  kls, n_steps = _sequence(2)
  ctrl = adaptive_kl_controller(0.1, target=6.0, horizon=500)
  expected = np_adaptive(0.1, 6.0, 500, kls, n_steps)
  np.testing.assert_allclose(_run(ctrl, kls.astype(np.float64), n_steps), expected, rtol=1e-5)


def test_adaptive_controller_scans_over_traced_inputs():
  """`update` runs inside lax.scan with traced observed_kl and n_steps (jit-able state)."""
  kls, n_steps = _sequence(3)
  ctrl = adaptive_kl_controller(0.2, target=6.0, horizon=2000)

  @jax.jit
  def run(kls, n_steps):
    def step(state, inputs):
      state = ctrl.update(state, *inputs)
      return state, state.coef

    return jax.lax.scan(step, ctrl.init(), (kls, n_steps))[1]

  got = run(jnp.asarray(kls, jnp.float32), jnp.asarray(n_steps, jnp.int32))
  np.testing.assert_allclose(got, np_adaptive(0.2, 6.0, 2000, kls, n_steps), rtol=1e-5)


_ADAPTIVE_UPDATE = jax.jit(adaptive_kl_controller(1.0, target=0.5, horizon=10_000.0).update)


@settings(max_examples=20, deadline=None)
@given(
    coef=st.floats(1e-4, 10.0),
    ratio=st.floats(0.0, 5.0),
    n=st.integers(1, 4096),
)
def test_adaptive_step_is_bounded_and_moves_towards_target(coef, ratio, n):
  target, horizon = 0.5, 10_000.0
  old = jnp.float32(coef)
  new = _ADAPTIVE_UPDATE(KLControllerState(old), jnp.float32(ratio * target), jnp.int32(n)).coef
  mult = float(new) / float(old)
  bound = 0.2 * n / horizon
  assert 1 - bound - 1e-6 <= mult <= 1 + bound + 1e-6
  kl32 = np.float32(ratio * target)
  if kl32 > target * (1 + 1e-5):
    assert mult > 1
  elif kl32 < target * (1 - 1e-5):
    assert mult < 1


# ---- PPO rule ----


def test_ppo_controller_halves_doubles_and_keeps():
  target = 0.01
  ctrl = ppo_kl_controller(1.0, target=target)
  state = ctrl.init()
  assert float(ctrl.update(state, target / 1.5 * 0.99, None).coef) == 0.5
  assert float(ctrl.update(state, target / 1.5 * 1.01, None).coef) == 1.0
  assert float(ctrl.update(state, target, 123).coef) == 1.0  # n_steps is ignored
  assert float(ctrl.update(state, target * 1.5 * 0.99).coef) == 1.0
  assert float(ctrl.update(state, target * 1.5 * 1.01).coef) == 2.0


@pytest.mark.parametrize("jit", [False, True])
def test_ppo_controller_matches_reference(jit):
  target = 0.02
  kls = target * np.random.default_rng(4).uniform(0.0, 3.0, size=STEPS)
  ctrl = ppo_kl_controller(0.7, target=target)
  got = _run(ctrl, kls.astype(np.float32), [None] * STEPS, jit=jit)
  np.testing.assert_allclose(got, np_ppo(0.7, target, kls.astype(np.float32)), rtol=1e-6)


# ---- pytree behaviour and bad input ----


def test_state_is_a_pytree():
  state = adaptive_kl_controller(0.2, target=6.0, horizon=100).init()
  leaves, treedef = jax.tree.flatten(state)
  assert len(leaves) == 1 and leaves[0].dtype == jnp.float32
  doubled = jax.tree.map(lambda x: 2 * x, state)
  assert isinstance(doubled, KLControllerState) and float(doubled.coef) == pytest.approx(0.4)


def test_nan_kl_propagates_into_adaptive_coef():
  """Documented: the rule is applied as written, so a NaN KL makes the coefficient NaN."""
  ctrl = adaptive_kl_controller(0.2, target=6.0, horizon=100)
  assert np.isnan(float(ctrl.update(ctrl.init(), jnp.nan, 10).coef))


def test_bad_hyper_parameters():
  with pytest.raises(ValueError, match="coef"):
    fixed_kl_controller(-0.1)
  with pytest.raises(ValueError, match="init_coef"):
    adaptive_kl_controller(-1.0, target=6.0, horizon=10)
  with pytest.raises(ValueError, match="target"):
    adaptive_kl_controller(0.1, target=0.0, horizon=10)
  with pytest.raises(ValueError, match="horizon"):
    adaptive_kl_controller(0.1, target=6.0, horizon=0)
  with pytest.raises(ValueError, match="init_beta"):
    ppo_kl_controller(-1.0, target=0.01)
  with pytest.raises(ValueError, match="target"):
    ppo_kl_controller(1.0, target=-0.01)
