"""Discounted returns and generalized advantage estimation over `[B, T]` token sequences.

Both recursions run backwards in time with `jax.lax.scan` (time-major, `[B]` carries), so they
compile to one loop whose size does not grow with `T`. Both functions are jitted inside: the
hyper-parameters are keyword-only scalars passed to the compiled core as traced arguments (no
recompilation when they change), so they can be called directly, or under a user's `jax.jit` or
`jax.vmap`.

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

Gradients: rewards, values, `bootstrap_value` and the (possibly traced) coefficients pass through
`jax.lax.stop_gradient`, so the outputs are constants (advantages never carry gradient into the
policy, and returns are fixed regression targets for the value function).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rljax.ops._checks import check_ndim, check_same_shape, compute_dtype
from rljax.ops.masking import safe_divide


def _check_unit_interval(name: str, value) -> None:
  """Raises `ValueError` unless the (concrete) scalar `value` lies in [0, 1]."""
  if isinstance(value, jax.core.Tracer):
    return  # a traced coefficient cannot be checked at trace time
  if jnp.ndim(value) != 0:
    raise ValueError(f"`{name}` must be a scalar in [0, 1]; got shape {jnp.shape(value)}.")
  if not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"`{name}` must lie in [0, 1]; got {value!r}.")


def _coefficient(value, dtype):
  """A scalar hyper-parameter as a rank-0 array of `dtype`, passed to the jitted core as a traced
  argument (one compilation for every value). A concrete value is rounded once, on the host."""
  if isinstance(value, jax.core.Tracer):
    return jnp.asarray(value).astype(dtype)
  return np.asarray(value, dtype)


def _check_bootstrap(bootstrap_value, batch: int):
  """`bootstrap_value` as an array (None stays None); raises unless its shape is `(batch,)`."""
  if bootstrap_value is None:
    return None
  if jnp.shape(bootstrap_value) != (batch,):
    raise ValueError(
        f"`bootstrap_value` must have shape ({batch},) (one value per row); "
        f"got {jnp.shape(bootstrap_value)}."
    )
  return jnp.asarray(bootstrap_value)


def _bootstrap(bootstrap_value, batch: int, dtype) -> jax.Array:
  """The value after the last valid token, `[B]`: 0 unless `bootstrap_value` is given."""
  if bootstrap_value is None:
    return jnp.zeros((batch,), dtype)
  return jax.lax.stop_gradient(jnp.asarray(bootstrap_value).astype(dtype))


def _as_array(x):
  """Arrays pass through (the jitted core transfers numpy inputs); lists become arrays, so that
  `jax.jit` does not see them as pytrees of Python scalars."""
  return x if isinstance(x, (jax.Array, np.ndarray, np.generic)) else jnp.asarray(x)


def _constant(x, dtype) -> jax.Array:
  return jax.lax.stop_gradient(jnp.asarray(x).astype(dtype))


# Formulation (measured on CPU with benchmarks/gae.py, B=256, T=2048): the recursions run over
# time with `[B]` carries, so the inputs are transposed once to time-major `[T, B]` and the output
# back once. Each step writes only the *carried* quantity (no extra select or second output per
# step); the 0 at masked positions and the returns A + V are formed after the one transpose back,
# batch-major. Batch-major loops over columns, a blocked two-level scan and a two-pass
# `associative_scan` were all 2-3x slower. Unrolling is not robust: `unroll=8` was ~5-10% faster
# for GAE at B=256, T=2048 (2 or 8 ~25% for the returns), but 10-50% slower at T <= 1024 or
# B = 64, and 16 or 32 were ~2x slower everywhere; so no unrolling. `unroll` is a private knob
# for the benchmark.
# Most of the whitened call is passes over [B, T] (the three input transposes cost ~2x the
# scan), so whitening is written out for advantages already 0 at masked positions
# (`_whiten_zeroed`): one transposing read of the scan output instead of two, and no re-zeroing
# or weighting. Processing [B, L] column blocks per step (L = 8..32, a cheaper blocked transpose)
# was 1.4-3.4x slower; a [T, 2, B] stack of rewards and values, an int32 count, counting the
# valid tokens in the scan, and passing the transposed bool `valid` (no per-step `!= 0`) were
# no faster.
_UNROLL = 1


@functools.partial(jax.jit, static_argnames=("unroll",))
def _discounted_returns(rewards, mask, gamma, bootstrap_value, *, unroll=_UNROLL):
  dtype = gamma.dtype
  gamma = jax.lax.stop_gradient(gamma)
  r = _constant(rewards, dtype)
  valid = jnp.asarray(mask) != 0

  def step(running, inputs):
    r_t, m_t = inputs
    running = jnp.where(m_t != 0, r_t + gamma * running, running)
    return running, running

  init = _bootstrap(bootstrap_value, r.shape[0], dtype)
  _, carried = jax.lax.scan(step, init, (r.T, jnp.asarray(mask).T), reverse=True, unroll=unroll)
  return jnp.where(valid, carried.T, 0)


@functools.partial(jax.jit, static_argnames=("whiten", "eps", "unroll"))
def _gae(rewards, values, mask, gamma, gamma_lam, bootstrap_value, *, whiten, eps, unroll=_UNROLL):
  dtype = gamma.dtype
  gamma, gamma_lam = jax.lax.stop_gradient((gamma, gamma_lam))
  r = _constant(rewards, dtype)
  v = _constant(values, dtype)
  valid = jnp.asarray(mask) != 0

  def step(carry, inputs):
    next_value, running_adv = carry
    r_t, v_t, m_t = inputs
    m_t = m_t != 0
    delta = r_t + gamma * next_value - v_t
    adv = delta + gamma_lam * running_adv
    running_adv = jnp.where(m_t, adv, running_adv)
    return (jnp.where(m_t, v_t, next_value), running_adv), running_adv

  init = (_bootstrap(bootstrap_value, r.shape[0], dtype), jnp.zeros((r.shape[0],), dtype))
  xs = (r.T, v.T, jnp.asarray(mask).T)
  _, carried = jax.lax.scan(step, init, xs, reverse=True, unroll=unroll)
  advantages = jnp.where(valid, carried.T, 0)
  returns = jnp.where(valid, advantages + v, 0)  # formed from the un-whitened advantages
  if whiten:
    advantages = _whiten_zeroed(advantages, valid, eps)
  return advantages, returns


def _whiten_zeroed(x, valid, eps: float) -> jax.Array:
  """`masked_whiten(x, valid, eps=eps)` for an `x` that is already 0 where the bool `valid` is
  False (the same values: μ = Σx / n, σ² = Σ_valid (x − μ)² / (n − 1), 0 when n ≤ 1).

  Written out because `masked_whiten` must first zero and weight x (its mask may hold weights),
  and XLA:CPU materialises those selects and products as extra passes over `[B, T]` (six after
  the scan, with a second transposing read of its output for the returns); here there are four
  (the advantages, the returns, the deviations x − μ, the output): 0.72x the time of the
  whitened GAE through `masked_whiten` at B=256, T=2048 (benchmarks/gae.py)."""
  n = jnp.sum(valid, dtype=x.dtype)
  mean = safe_divide(jnp.sum(x), n)
  deviation = jnp.where(valid, x - mean, 0)
  var = safe_divide(jnp.sum(deviation * deviation), jnp.maximum(n - 1, 0))
  return deviation * jax.lax.rsqrt(var + eps)


def discounted_returns(rewards, mask, *, gamma: float, bootstrap_value=None) -> jax.Array:
  """Reward-to-go G_t = r_t + γ·G_{next valid}, skipping masked positions.

  Scanning t = T-1 … 0 with a running return G (initialised to `bootstrap_value`, default 0):
    if mask_t:  G ← r_t + γ·G;  out_t = G
    else:       out_t = 0       (G carried across unchanged; r_t ignored)
  With a mask of only trailing padding this is the textbook G_t = Σ_{k≥t} γ^{k-t} r_k over the
  response.

  Jitted inside (no need to wrap it in `jax.jit`; calling it under a user's `jit` or `vmap` works
  too). `gamma` is a traced argument, so sweeping it does not recompile; it may itself be a traced
  scalar. One compilation per input shape and dtype (and `bootstrap_value` given or None).

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
  bootstrap_value = _check_bootstrap(bootstrap_value, jnp.shape(rewards)[0])
  dtype = compute_dtype(rewards)
  return _discounted_returns(
      _as_array(rewards), _as_array(mask), _coefficient(gamma, dtype), bootstrap_value
  )


def gae(
    rewards, values, mask, *, gamma: float, lam: float, bootstrap_value=None,
    whiten: bool = False, eps: float = 1e-8,
):
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

  By default the advantages are *not* whitened. `whiten=True` applies
  `masked_whiten(advantages, mask != 0, eps=eps)` (batch mean and unbiased variance over the valid
  tokens, 0 at masked positions; as verl and TRL do for PPO) in the same compiled program, which
  saves a second dispatch (or, outside `jit`, masked_whiten's eager ops). The returns are always
  formed from the un-whitened advantages.

  Jitted inside (no need to wrap it in `jax.jit`; calling it under a user's `jit` or `vmap` works
  too). `gamma` and `lam` are traced arguments, so sweeping them does not recompile, and they may
  themselves be traced scalars; γ and γλ are rounded to the compute dtype once (γλ is formed in
  Python double precision when both are concrete). `whiten` and `eps` are static. One compilation
  per input shape and dtype (and per `whiten`, `eps`, and `bootstrap_value` given or None).

  Args:
    rewards: [B, T] per-token rewards (e.g. from `token_level_rewards`).
    values: [B, T] value estimates V_t of the state before token t.
    mask: [B, T] bool or numeric; nonzero marks a response token (policy action). Masked
      positions are skipped (see the module docstring); their rewards and values are ignored.
    gamma: discount in [0, 1] (verl's default 1.0).
    lam: GAE λ in [0, 1] (verl's default 1.0; 0.95 is common in TRL's PPO).
    bootstrap_value: optional [B] value after the last valid token (for truncated responses);
      None (default) means the episode ends there (value 0).
    whiten: whiten the advantages over the valid tokens of the whole batch (default False).
    eps: added to the variance when whitening (1e-8, as `masked_whiten`, TRL and verl).

  Returns:
    (advantages, returns), both [B, T] in `promote_types(result_type(rewards, values), float32)`,
    0 at masked positions (a row with no valid token is all 0). Both are stop-gradient constants.

  Example:
    >>> adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95, whiten=True)
    >>> # the same as: adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    >>> #              adv = masked_whiten(adv, mask)      (for a 0/1 mask)
  """
  check_ndim("rewards", rewards, 2)
  check_same_shape(rewards=rewards, values=values, mask=mask)
  _check_unit_interval("gamma", gamma)
  _check_unit_interval("lam", lam)
  bootstrap_value = _check_bootstrap(bootstrap_value, jnp.shape(rewards)[0])
  dtype = compute_dtype(rewards, values)
  if isinstance(gamma, jax.core.Tracer) or isinstance(lam, jax.core.Tracer):
    gamma_lam = jnp.asarray(gamma).astype(dtype) * jnp.asarray(lam).astype(dtype)
  else:
    gamma_lam = float(gamma) * float(lam)
  return _gae(
      _as_array(rewards), _as_array(values), _as_array(mask),
      _coefficient(gamma, dtype), _coefficient(gamma_lam, dtype),
      bootstrap_value, whiten=bool(whiten), eps=float(eps),
  )
