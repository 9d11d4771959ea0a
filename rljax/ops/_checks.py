"""Argument checks and numerical constants shared by the functional core and every config.

Checks run at trace time (on static shapes and Python options), so they cost nothing under
`jax.jit`, and in the configs' `__post_init__` (so a bad hyper-parameter fails at construction).
Every failure is a `ValueError` that names the offending argument or field, its value and the
valid range.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

# Log-ratios are clipped to ±LOG_RATIO_CLAMP before `exp` (exp(20) ≈ 4.9e8 stays finite in bf16
# and float32, and its square in a k2/k3 term stays below float32's max). Same constant as verl's
# `low_var_kl`.
LOG_RATIO_CLAMP = 20.0


def check_same_shape(**arrays) -> None:
  """Raises `ValueError` unless all named arrays have the same shape; the message names both."""
  items = [(name, jnp.shape(x)) for name, x in arrays.items() if x is not None]
  if not items:
    return
  ref_name, ref_shape = items[0]
  for name, shape in items[1:]:
    if shape != ref_shape:
      raise ValueError(
          f"`{name}` has shape {shape} but `{ref_name}` has shape {ref_shape}; they must match."
      )


def check_ndim(name: str, x, ndims: int | Iterable[int]) -> None:
  """Raises `ValueError` unless `x.ndim` is one of `ndims`."""
  allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
  if jnp.ndim(x) not in allowed:
    want = " or ".join(str(n) for n in allowed)
    raise ValueError(f"`{name}` must have rank {want}; got shape {jnp.shape(x)}.")


def check_integer_ids(name: str, ids) -> None:
  """Raises `ValueError` naming `name` unless `ids` has an integer dtype (token ids)."""
  dtype = jnp.result_type(ids)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"`{name}` must hold integer token ids; got dtype {dtype}.")


def check_arrays(ndim: int, **arrays) -> None:
  """Each named array (None skipped) must have rank `ndim`, and all must have the same shape."""
  for name, x in arrays.items():
    if x is not None:
      check_ndim(name, x, ndim)
  check_same_shape(**arrays)


def check_choice(name: str, value: str, choices: Iterable[str] | Mapping[str, object]) -> None:
  """Raises `ValueError` listing the valid choices unless `value` is one of them."""
  valid = list(choices)
  if value not in valid:
    raise ValueError(f"Unknown {name} {value!r}; valid choices: {', '.join(map(repr, valid))}.")


def check_positive(name: str, value: float) -> None:
  if not value > 0:
    raise ValueError(f"`{name}` must be > 0; got {value!r}.")


def check_nonnegative(name: str, value: float) -> None:
  if not value >= 0:
    raise ValueError(f"`{name}` must be >= 0; got {value!r}.")


def check_bool(name: str, value: Any, *, optional: bool = False) -> None:
  """ValueError naming `name` unless `value` is a bool (or None when `optional`)."""
  if not (isinstance(value, bool) or (optional and value is None)):
    allowed = "True, False or None" if optional else "True or False"
    raise ValueError(f"`{name}` must be {allowed}; got {value!r}.")


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
  """ValueError naming `name` unless `value` is an integer (Python or numpy, not a bool) >=
  `minimum` (or None when `optional`)."""
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    none = "None or " if optional else ""
    raise ValueError(f"`{name}` must be {none}an int >= {minimum}; got {value!r}.")


def check_number(name: str, value: Any, *, low: float = 0.0, high: float = float("inf"),
                 low_open: bool = False, high_open: bool = True, optional: bool = False) -> None:
  """ValueError naming `name` unless `value` is a real number (Python or numpy, not a bool or
  NaN) in the range from `low`
  to `high` (each end open or closed; default [0, inf), so ±inf and NaN fail), or None when
  `optional`."""
  if optional and value is None:
    return
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value
  if ok:
    ok = (value > low if low_open else value >= low) and (
      value < high if high_open else value <= high)
  if not ok:
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    none = "None or " if optional else ""
    raise ValueError(f"`{name}` must be {none}a number in {lo}{low:g}, {high:g}{hi}; "
                     f"got {value!r}.")


def check_group_size(batch: int, group_size: int, *, name: str = "scores") -> int:
  """Validates contiguous groups of `group_size` rows and returns the number of groups."""
  if not isinstance(group_size, int) or group_size < 2:
    raise ValueError(f"`group_size` must be an int >= 2 for group estimators; got {group_size!r}.")
  if batch % group_size != 0:
    raise ValueError(
        f"The batch size of `{name}` ({batch}) is not divisible by `group_size` ({group_size})."
    )
  return batch // group_size


def compute_dtype(*arrays) -> jnp.dtype:
  """The dtype for reductions: the inputs' result type promoted to at least float32."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def as_float_mask(mask, dtype) -> jax.Array:
  """A bool or numeric mask as a float array of `dtype` (weights are kept as given)."""
  return jnp.asarray(mask).astype(dtype)


def where_valid(x, mask) -> jax.Array:
  """x where `mask` != 0, else 0 (in x's dtype; `mask` broadcasts against x).

  A select, not a product: entries under mask 0 are never read, so a NaN, ±inf or 1e30 there
  reaches neither the value nor the gradient. (With x·mask, or with the mask applied only after
  a nonlinear function of x, the backward forms 0·NaN = NaN at those entries.) Every masked
  reduction and loss of rljax applies it to its inputs first, so that garbage at masked
  positions gives exactly the values and gradients of zeros there.

  Example:
    >>> where_valid(jnp.array([1., jnp.nan]), jnp.array([1, 0]))  # [1., 0.]
  """
  x = jnp.asarray(x)
  return jnp.where(jnp.asarray(mask) != 0, x, jnp.zeros((), x.dtype))


def clamped_exp(log_ratio) -> jax.Array:
  """exp(clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)); finite for any finite input."""
  return jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
