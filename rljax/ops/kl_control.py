"""KL-coefficient controllers in the optax style: pure `init` / `update` functions over a pytree.

A controller is a `KLController(init, update)` (like `optax.GradientTransformation`):

    ctrl = adaptive_kl_controller(0.2, target=6.0, horizon=10_000)
    state = ctrl.init()                            # KLControllerState(coef=Array(0.2))
    reward = score - state.coef * kl               # use the coefficient
    state = ctrl.update(state, observed_kl, n_steps)  # jit-able; arguments may be traced

The state is a `KLControllerState` NamedTuple whose `coef` is a float32 scalar array, so it can
live inside a jitted train state and be checkpointed like any other pytree. The
hyper-parameters (target, horizon) are Python constants closed over by `update`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rljax.ops._checks import check_nonnegative, check_positive

# Bounds of the proportional error in the adaptive rule (Ziegler et al. 2019, TRL, verl).
ADAPTIVE_ERROR_CLIP = 0.2
# PPO paper, sec. 4: β changes when the KL leaves [target / 1.5, target · 1.5], by a factor 2.
PPO_KL_TOLERANCE = 1.5
PPO_BETA_FACTOR = 2.0


class KLControllerState(NamedTuple):
  """State of a KL controller: `coef`, the current KL coefficient (float32 scalar array)."""

  coef: jax.Array


class KLController(NamedTuple):
  """A KL controller: `init() -> state`, `update(state, observed_kl, n_steps) -> state`."""

  init: Callable[[], KLControllerState]
  update: Callable[..., KLControllerState]


def _initial_state(coef: float) -> Callable[[], KLControllerState]:
  def init() -> KLControllerState:
    return KLControllerState(coef=jnp.asarray(coef, jnp.float32))

  return init


def fixed_kl_controller(coef: float) -> KLController:
  """A constant KL coefficient: `update` returns the state unchanged.

  Args:
    coef: the coefficient β ≥ 0.

  Returns:
    `KLController`; `update(state, observed_kl, n_steps=None)` ignores its arguments (they are
    accepted so that controllers are interchangeable). verl's `FixedKLController`.

  Example:
    >>> ctrl = fixed_kl_controller(0.05)
    >>> state = ctrl.update(ctrl.init(), 0.3, 256)   # state.coef == 0.05
  """
  check_nonnegative("coef", coef)

  def update(state: KLControllerState, observed_kl=None, n_steps=None) -> KLControllerState:
    del observed_kl, n_steps
    return state

  return KLController(init=_initial_state(coef), update=update)


def adaptive_kl_controller(init_coef: float, *, target: float, horizon: float) -> KLController:
  """Proportional controller of the KL coefficient towards a target KL (Ziegler et al. 2019).

    e    = clip(observed_kl / target − 1, −0.2, 0.2)
    coef ← coef · (1 + e · n_steps / horizon)

  the log-space proportional controller of "Fine-Tuning Language Models from Human Preferences"
  (Ziegler et al. 2019, sec. 2.2: β ← β·(1 + K_β·e)), with the gain K_β = n_steps / horizon as in
  the authors' code and in TRL's and verl's `AdaptiveKLController` (which pass the batch size as
  `n_steps`). The
  coefficient stays ≥ 0 as long as n_steps ≤ 5·horizon (the rule is applied as written; no
  extra floor). A NaN `observed_kl` propagates into `coef`.

  Args:
    init_coef: initial coefficient ≥ 0 (e.g. 0.2 in TRL's PPO defaults, 0.001 in verl).
    target: target KL > 0 (e.g. 6.0 in TRL's PPO, verl's `target_kl`).
    horizon: horizon > 0 in samples (e.g. 10000, as TRL and verl).

  Returns:
    `KLController`; `update(state, observed_kl, n_steps)` with `observed_kl` a scalar (e.g. the
    batch-mean sequence KL) and `n_steps` the number of samples since the last update; both may
    be traced arrays. The new coefficient keeps dtype float32.

  Example:
    >>> ctrl = adaptive_kl_controller(0.2, target=6.0, horizon=10_000)
    >>> state = jax.jit(ctrl.update)(ctrl.init(), 9.0, 256)  # 0.2 · (1 + 0.2·256/10000)
  """
  check_nonnegative("init_coef", init_coef)
  check_positive("target", target)
  check_positive("horizon", horizon)

  def update(state: KLControllerState, observed_kl, n_steps) -> KLControllerState:
    coef = jnp.asarray(state.coef)
    kl = jnp.asarray(observed_kl, coef.dtype)
    error = jnp.clip(kl / target - 1, -ADAPTIVE_ERROR_CLIP, ADAPTIVE_ERROR_CLIP)
    mult = 1 + error * jnp.asarray(n_steps, coef.dtype) / horizon
    return KLControllerState(coef=(coef * mult).astype(coef.dtype))

  return KLController(init=_initial_state(init_coef), update=update)


def ppo_kl_controller(init_beta: float, *, target: float) -> KLController:
  """The PPO paper's rule for the KL-penalty coefficient β (Schulman et al. 2017, sec. 4).

    if observed_kl < target / 1.5:  β ← β / 2
    if observed_kl > target · 1.5:  β ← β · 2
    otherwise                       β unchanged

  The paper notes that 1.5 and 2 are chosen heuristically and that the algorithm is not very
  sensitive to them, nor to the initial β. Pair it with `ppo_penalty_loss`.

  Args:
    init_beta: initial β ≥ 0 (the paper uses 1 among its settings; β = 0 stays 0).
    target: target KL d_targ > 0 (e.g. 0.01 in the paper's experiments).

  Returns:
    `KLController`; `update(state, observed_kl, n_steps=None)` (`n_steps` has no meaning here and
    is ignored). Jit-able; `observed_kl` may be traced.

  Example:
    >>> ctrl = ppo_kl_controller(1.0, target=0.01)
    >>> state = ctrl.update(ctrl.init(), 0.001, None)   # β = 0.5
  """
  check_nonnegative("init_beta", init_beta)
  check_positive("target", target)
  low, high = target / PPO_KL_TOLERANCE, target * PPO_KL_TOLERANCE

  def update(state: KLControllerState, observed_kl, n_steps=None) -> KLControllerState:
    del n_steps
    beta = jnp.asarray(state.coef)
    kl = jnp.asarray(observed_kl, beta.dtype)
    beta = jnp.where(kl < low, beta / PPO_BETA_FACTOR, beta)
    beta = jnp.where(kl > high, beta * PPO_BETA_FACTOR, beta)
    return KLControllerState(coef=beta)

  return KLController(init=_initial_state(init_beta), update=update)
