"""Discounted returns and generalized advantage estimation over `[B, T]` token sequences.

Both recursions run backwards in time with `jax.lax.scan` (time-major, `[B]` carries), so they
compile to one loop whose size does not grow with `T`.

Mask semantics (shared by every function here). Positions where `mask` is 0 are *skipped* by the
recursion: the carried quantities (the next value, the running advantage, the running return)
pass across them unchanged, so interleaved non-policy tokens (tool outputs, observations) do not
break the recursion, and trailing padding does not enter it. Rewards and values at masked
positions are ignored, and the outputs there are 0. This is verl's `compute_gae_advantage_return`
with a response mask ("skip values and TD-error on observation tokens",
verl/trainer/ppo/core_algos.py, volcengine/verl@012be9d9), except that verl leaves the carried
advantage at masked positions where we write 0.

The episode ends after the last valid token: the value there is 0 unless `bootstrap_value` is
given (for a response truncated before it finished).

Gradients: rewards, values and `bootstrap_value` pass through `jax.lax.stop_gradient`, so the
outputs are constants (advantages never carry gradient into the policy, and returns are fixed
regression targets for the value function).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rljax.ops._checks import check_ndim, check_same_shape, compute_dtype


def _check_unit_interval(name: str, value) -> None:
  """Raises `ValueError` unless the (concrete) scalar `value` lies in [0, 1]."""
  if isinstance(value, jax.core.Tracer):
    return  # a traced coefficient cannot be checked at trace time
  if jnp.ndim(value) != 0:
    raise ValueError(f"`{name}` must be a scalar in [0, 1]; got shape {jnp.shape(value)}.")
  if not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"`{name}` must lie in [0, 1]; got {value!r}.")


def _bootstrap(bootstrap_value, batch: int, dtype) -> jax.Array:
  """The value after the last valid token, `[B]`: 0 unless `bootstrap_value` is given."""
  if bootstrap_value is None:
    return jnp.zeros((batch,), dtype)
  if jnp.shape(bootstrap_value) != (batch,):
    raise ValueError(
        f"`bootstrap_value` must have shape ({batch},) (one value per row); "
        f"got {jnp.shape(bootstrap_value)}."
    )
  return jax.lax.stop_gradient(jnp.asarray(bootstrap_value).astype(dtype))


def _time_major(x, dtype) -> jax.Array:
  return jax.lax.stop_gradient(jnp.asarray(x).astype(dtype)).T


def discounted_returns(rewards, mask, *, gamma: float, bootstrap_value=None) -> jax.Array:
  """Reward-to-go G_t = r_t + γ·G_{next valid}, skipping masked positions.

  Scanning t = T-1 … 0 with a running return G (initialised to `bootstrap_value`, default 0):
    if mask_t:  G ← r_t + γ·G;  out_t = G
    else:       out_t = 0       (G carried across unchanged; r_t ignored)
  With a mask of only trailing padding this is the textbook G_t = Σ_{k≥t} γ^{k-t} r_k over the
  response.

  Args:
    rewards: [B, T] per-token rewards (e.g. from `token_level_rewards`). Rewards at masked
      positions are ignored, so place them on valid tokens.
    mask: [B, T] bool or numeric; nonzero marks a token that takes part in the recursion.
    gamma: discount in [0, 1] (keyword-only; 1.0 in most LLM RL, as verl's default).
    bootstrap_value: optional [B] value of the state after the last valid token, for truncated
      responses; default None means the episode ends there (value 0).

  Returns:
    [B, T] returns in `promote_types(rewards.dtype, float32)`, 0 at masked positions; a row with
    no valid token is all 0. No gradient flows to `rewards` (stop-gradient).

  Example:
    >>> discounted_returns(jnp.array([[0., 0., 1.]]), jnp.array([[1, 1, 1]]), gamma=0.5)
    >>> # [[0.25, 0.5, 1.0]]
  """
  check_ndim("rewards", rewards, 2)
  check_same_shape(rewards=rewards, mask=mask)
  _check_unit_interval("gamma", gamma)
  dtype = compute_dtype(rewards)
  r = _time_major(rewards, dtype)
  valid = jnp.asarray(mask).T != 0
  init = _bootstrap(bootstrap_value, r.shape[1], dtype)
  gamma = jnp.asarray(gamma, dtype)

  def step(running, inputs):
    r_t, m_t = inputs
    g = r_t + gamma * running
    return jnp.where(m_t, g, running), jnp.where(m_t, g, 0)

  _, out = jax.lax.scan(step, init, (r, valid), reverse=True)
  return out.T


def gae(rewards, values, mask, *, gamma: float, lam: float, bootstrap_value=None):
  """Generalized advantage estimation (Schulman et al., 2016), skipping masked positions.

  Scanning t = T-1 … 0 with carries next_value (initialised to `bootstrap_value`, default 0)
  and running_adv (initialised to 0):
    if mask_t:  δ_t = r_t + γ·next_value − V_t
                A_t = δ_t + γλ·running_adv
                next_value ← V_t;  running_adv ← A_t
    else:       A_t = 0            (both carries pass across unchanged)
  and returns R_t = A_t + V_t on valid tokens (the λ-return, the value-function target).
  Special cases: λ = 1 gives A_t = G_t − V_t (reward-to-go minus value); λ = 0 gives the
  one-step TD error r_t + γ·V_{next valid} − V_t.

  The advantages are *not* whitened (use `masked_whiten(advantages, mask)`, as verl and TRL do
  for PPO).

  Args:
    rewards: [B, T] per-token rewards (e.g. from `token_level_rewards`).
    values: [B, T] value estimates V_t of the state before token t.
    mask: [B, T] bool or numeric; nonzero marks a response token (policy action). Masked
      positions are skipped (see the module docstring); their rewards and values are ignored.
    gamma: discount in [0, 1] (verl's default 1.0).
    lam: GAE λ in [0, 1] (verl's default 1.0; 0.95 is common in TRL's PPO).
    bootstrap_value: optional [B] value after the last valid token (for truncated responses);
      None (default) means the episode ends there (value 0).

  Returns:
    (advantages, returns), both [B, T] in `promote_types(result_type(rewards, values), float32)`,
    0 at masked positions (a row with no valid token is all 0). Both are stop-gradient constants.

  Example:
    >>> adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    >>> adv = masked_whiten(adv, mask)
  """
  check_ndim("rewards", rewards, 2)
  check_same_shape(rewards=rewards, values=values, mask=mask)
  _check_unit_interval("gamma", gamma)
  _check_unit_interval("lam", lam)
  dtype = compute_dtype(rewards, values)
  r = _time_major(rewards, dtype)
  v = _time_major(values, dtype)
  valid = jnp.asarray(mask).T != 0
  next_value = _bootstrap(bootstrap_value, r.shape[1], dtype)
  running_adv = jnp.zeros_like(next_value)
  gamma, gamma_lam = jnp.asarray(gamma, dtype), jnp.asarray(gamma * lam, dtype)

  def step(carry, inputs):
    next_value, running_adv = carry
    r_t, v_t, m_t = inputs
    delta = r_t + gamma * next_value - v_t
    adv = delta + gamma_lam * running_adv
    carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, running_adv))
    return carry, (jnp.where(m_t, adv, 0), jnp.where(m_t, adv + v_t, 0))

  # Returns are emitted by the scan itself (one pass over memory instead of two).
  _, (adv, returns) = jax.lax.scan(step, (next_value, running_adv), (r, v, valid), reverse=True)
  return adv.T, returns.T
