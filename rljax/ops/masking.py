"""Masked reductions and loss aggregation over `[B, T]` token arrays.

A `mask` is bool or numeric, broadcast-compatible with `x` after `check_same_shape`; 1 (or True)
marks a token that counts, and numeric masks act as weights. Every reduction runs in
`promote_types(x.dtype, float32)` and is safe on an all-zero mask: the result is 0 and the
gradient is finite (0), never NaN. Masked entries are selected away before anything is computed
from them (`where_valid`), so a NaN or ±inf under mask 0 changes neither a result nor a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rljax.ops._checks import (
    as_float_mask,
    check_choice,
    check_ndim,
    check_same_shape,
    compute_dtype,
    where_valid,
)
from rljax.ops.segments import segment_sum

AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def safe_divide(numerator, denominator) -> jax.Array:
  """numerator / denominator, and 0 where the denominator is 0 (gradients stay finite)."""
  nonzero = denominator != 0
  return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def _weighted_sum(x, m, axis=None, keepdims=False) -> jax.Array:
  """Σ m·x, where masked entries of x are never read (a NaN or inf under mask 0 stays out)."""
  return jnp.sum(where_valid(x, m) * m, axis=axis, keepdims=keepdims)


def _prepare(x, mask):
  """(x in the compute dtype with its masked entries 0, the mask as float weights)."""
  check_same_shape(x=x, mask=mask)
  dtype = compute_dtype(x)
  m = as_float_mask(mask, dtype)
  return where_valid(jnp.asarray(x).astype(dtype), m), m


def masked_sum(x, mask, axis=None) -> jax.Array:
  """Σ mask·x over `axis` (all axes when None).

  Args:
    x: array of any shape.
    mask: same shape as `x`; bool or weights.
    axis: axis or axes to reduce; None reduces everything.

  Returns:
    The masked sum, in `promote_types(x.dtype, float32)`.

  Example:
    >>> masked_sum(jnp.array([[1., 2., 3.]]), jnp.array([[1, 1, 0]]))  # 3.0
  """
  x, m = _prepare(x, mask)
  return _weighted_sum(x, m, axis)


def masked_mean(x, mask, axis=None) -> jax.Array:
  """Σ mask·x / Σ mask over `axis`; 0 where the mask sums to 0 (with a zero gradient).

  Args:
    x: array of any shape.
    mask: same shape as `x`; bool or weights.
    axis: axis or axes to reduce; None reduces everything.

  Returns:
    The masked mean, in `promote_types(x.dtype, float32)`.

  Example:
    >>> masked_mean(jnp.array([[1., 2., 3.]]), jnp.array([[1, 1, 0]]))  # 1.5
  """
  x, m = _prepare(x, mask)
  return safe_divide(_weighted_sum(x, m, axis), jnp.sum(m, axis=axis))


def masked_var(x, mask, *, unbiased: bool = True, axis=None) -> jax.Array:
  """Masked variance Σ mask·(x − μ)² / (n − 1) (or / n when `unbiased=False`), n = Σ mask.

  The default is the unbiased (Bessel-corrected) estimator, as in TRL and verl's `masked_var`.
  Degenerate input: with n ≤ 1 (unbiased) or n = 0 (biased) the variance is 0, not NaN.

  Args:
    x: array of any shape.
    mask: same shape as `x`.
    unbiased: divide by n − 1 (True) or n (False).
    axis: axis or axes to reduce; None reduces everything.

  Returns:
    The variance over `axis`, in `promote_types(x.dtype, float32)`.

  Example:
    >>> masked_var(jnp.array([1., 2., 3., 100.]), jnp.array([1, 1, 1, 0]))  # 1.0
  """
  x, m = _prepare(x, mask)
  mean = safe_divide(_weighted_sum(x, m, axis, True), jnp.sum(m, axis=axis, keepdims=True))
  n = jnp.sum(m, axis=axis)
  denom = jnp.maximum(n - 1, 0) if unbiased else n
  return safe_divide(_weighted_sum(jnp.square(x - mean), m, axis), denom)


def masked_whiten(x, mask, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
  """(x − μ) / sqrt(σ² + eps) over the valid entries, with μ, σ² the masked mean and unbiased var.

  With `shift_mean=False` the mean is added back: (x − μ)/sqrt(σ² + eps) + μ (verl / TRL
  convention, used to rescale rewards without moving them). Masked positions are set to 0.
  A zero-variance input gives (x − μ)/sqrt(eps) = 0 at valid entries, never NaN; an all-zero mask
  gives all zeros.

  Args:
    x: array of any shape (typically `[B, T]` advantages).
    mask: same shape as `x`.
    shift_mean: keep the result zero-mean (True) or add the mean back (False).
    eps: added to the variance before the square root (1e-8, as TRL and verl).

  Returns:
    The whitened array, shape of `x`, in `promote_types(x.dtype, float32)`; 0 where masked.

  Example:
    >>> masked_whiten(advantages, mask)  # zero mean, unit variance over the valid tokens
  """
  x, m = _prepare(x, mask)
  mean = masked_mean(x, m)
  var = masked_var(x, m, unbiased=True)
  whitened = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(m != 0, whitened, 0)


def sequence_sums(x, m, segment_ids=None, num_segments: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """(Σ_t m·x, Σ_t m) per sequence: per row [B] of `[B, T]` arrays, or per packed sequence [N]
  with `segment_ids` and `num_segments` (both or neither)."""
  if (segment_ids is None) != (num_segments is None):
    raise ValueError("`segment_ids` and `num_segments` go together (packed rows); got "
                     f"segment_ids={'None' if segment_ids is None else 'an array'}, "
                     f"num_segments={num_segments!r}.")
  if segment_ids is None:
    return _weighted_sum(x, m, axis=-1), jnp.sum(m, axis=-1)
  check_same_shape(x=x, segment_ids=segment_ids)
  return (segment_sum(x, segment_ids, num_segments, mask=m),
          segment_sum(m, segment_ids, num_segments))


def aggregate(loss_mat, mask, mode: str, *, horizon: int | None = None, normalizer=None,
              segment_ids=None, num_segments: int | None = None) -> jax.Array:
  """Reduces a `[B, T]` per-token loss to a scalar.

  With m the mask, n_b = Σ_t m_bt and V = {b : n_b > 0} the rows with at least one valid token:
    token-mean               Σ_bt m·L / Σ_bt m                      (DAPO, "token-level")
    token-sum                Σ_bt m·L
    seq-mean-token-mean      1/|V| Σ_{b∈V} (Σ_t m·L / n_b)          (GRPO paper)
    seq-mean-token-sum       1/|V| Σ_{b∈V} Σ_t m·L
    seq-mean-token-sum-norm  1/|V| Σ_{b∈V} Σ_t m·L / horizon         (Dr. GRPO; verl 0.9.1)

  `normalizer` replaces the outer denominator (Σ m for `token-mean`, |V| for the seq-mean modes)
  by a global count, so that the sum over microbatches (or data-parallel shards) of
  `aggregate(L_i, m_i, mode, normalizer=global_count)` is exactly the full-batch loss, and so is
  its gradient. `token-sum` has no denominator and rejects a normalizer. A zero denominator
  gives 0.

  Packed rows (several sequences per row): with `segment_ids` [B, T] (the sequence index of each
  token, ids outside [0, num_segments) belong to none) the sums over b run over sequences
  instead of rows, n_b = Σ_{t ∈ b} m_t (`rljax.ops.segments.segment_sum`), so a packed batch
  aggregates exactly as its unpacked rows do.

  Args:
    loss_mat: [B, T] per-token loss.
    mask: [B, T] bool or weights.
    mode: one of "token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
      "seq-mean-token-sum-norm".
    horizon: divisor for "seq-mean-token-sum-norm" (default T, the padded length); the same
      constant must be used across microbatches.
    normalizer: optional scalar (Python number or array) overriding the outer denominator.
    segment_ids, num_segments: packed rows' sequence ids [B, T] and their static count N.

  Returns:
    Scalar loss in `promote_types(loss_mat.dtype, float32)`.

  Example:
    >>> loss = aggregate(per_token_loss, mask, "seq-mean-token-mean")
    >>> # microbatched, exact: sum_i aggregate(L_i, m_i, "token-mean", normalizer=total_tokens)
  """
  check_choice("aggregation `agg`", mode, AGG_MODES)  # the name every loss and config uses
  check_ndim("loss_mat", loss_mat, 2)
  loss, m = _prepare(loss_mat, mask)
  token_sums, token_counts = sequence_sums(loss, m, segment_ids, num_segments)
  if mode == "token-sum":
    if normalizer is not None:
      raise ValueError("`normalizer` is not used by mode 'token-sum' (a sum has no denominator).")
    return jnp.sum(token_sums)
  if mode == "token-mean":
    denom = jnp.sum(token_counts) if normalizer is None else normalizer
    return safe_divide(jnp.sum(token_sums), jnp.asarray(denom, loss.dtype))
  if mode == "seq-mean-token-mean":
    per_seq = safe_divide(token_sums, token_counts)
  elif mode == "seq-mean-token-sum":
    per_seq = token_sums
  else:
    horizon = loss.shape[-1] if horizon is None else horizon
    per_seq = token_sums / horizon
  valid_rows = (token_counts != 0).astype(loss.dtype)
  denom = jnp.sum(valid_rows) if normalizer is None else normalizer
  return safe_divide(jnp.sum(per_seq * valid_rows), jnp.asarray(denom, loss.dtype))
