"""The critic's loss for PPO with a learned value function."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rljax.ops._checks import check_arrays, check_positive, compute_dtype, where_valid
from rljax.ops.masking import aggregate, masked_mean


def value_loss(values, old_values, returns, mask, *, clip_eps: float | None = None, agg: str = "token-mean",
               segment_ids=None, num_segments: int | None = None):
  """Squared-error value loss, optionally clipped around the rollout's values (PPO2 / verl).

    unclipped:  ℓ = ½ (V − R)²
    clipped:    V_c = V_old + clip(V − V_old, −ε, ε);   ℓ = ½ max((V − R)², (V_c − R)²)
    L = agg(ℓ)

  The clipped form is the pessimistic one of OpenAI baselines' PPO2 and verl's
  `compute_value_loss` (both use the ½ and the max). `returns` and `old_values` are
  stop-gradient; only `values` carries gradient.

  Args:
    values: [B, T] current value predictions.
    old_values: [B, T] value predictions at rollout time (used only when clipping).
    returns: [B, T] regression targets (e.g. the `returns` of `gae`).
    mask: [B, T] response mask.
    clip_eps: ε of the value clip (verl's `cliprange_value` default is 0.5); None disables it.
    agg: aggregation mode (default "token-mean").
    segment_ids, num_segments: packed rows' sequence ids and count (`aggregate`).

  Returns:
    (loss, metrics): `vf_clipfrac` (tokens where the clipped error is the larger one),
    `value_mean`, `value_error` (token mean of (V − R)²).

  Example:
    >>> advantages, returns = gae(rewards, old_values, mask, gamma=1.0, lam=0.95)
    >>> loss, metrics = value_loss(values, old_values, returns, mask, clip_eps=0.2)
  """
  check_arrays(2, values=values, old_values=old_values, returns=returns, mask=mask)
  dtype = compute_dtype(values, returns)
  # Masked positions are 0 before anything is computed (garbage there never reaches the loss
  # or the gradient).
  values, old_values, returns = (where_valid(x, mask) for x in (values, old_values, returns))
  v = values.astype(dtype)
  target = jax.lax.stop_gradient(returns).astype(dtype)
  err = jnp.square(v - target)
  clipped = jnp.zeros(err.shape, bool)
  if clip_eps is not None:
    check_positive("clip_eps", clip_eps)
    old = jax.lax.stop_gradient(old_values).astype(dtype)
    err_clipped = jnp.square(old + jnp.clip(v - old, -clip_eps, clip_eps) - target)
    clipped = err_clipped > err
    err = jnp.maximum(err, err_clipped)
  metrics = {
      "vf_clipfrac": masked_mean(clipped, mask),
      "value_mean": jax.lax.stop_gradient(masked_mean(v, mask)),
      "value_error": jax.lax.stop_gradient(masked_mean(jnp.square(v - target), mask)),
  }
  return 0.5 * aggregate(err, mask, agg, segment_ids=segment_ids,
                         num_segments=num_segments), metrics
