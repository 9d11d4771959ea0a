"""Trust-region policy step (TRPO, Schulman et al. 2015) on any parameter pytree.

The natural-gradient direction F⁻¹(−g) is found by conjugate gradient on Fisher-vector products,
each one a Hessian-of-KL-vector product `jax.jvp(jax.grad(kl_fn), (θ,), (v,))` (forward over
reverse), so the Fisher matrix is never formed. The step is scaled to the KL radius and then
shortened by a backtracking line search. Defaults follow OpenAI Spinning Up's `trpo`
(delta=0.01, damping_coeff=0.1, cg_iters=10, backtrack_iters=10, backtrack_coeff=0.8);
OpenAI Baselines' `trpo_mpi` uses cg_damping=1e-2 and halves the step (ratio 0.5) 10 times.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rljax.ops._checks import check_positive, compute_dtype
from rljax.ops.masking import safe_divide

# Squared-residual threshold at which conjugate gradient stops early (OpenAI Baselines'
# `cg(..., residual_tol=1e-10)`).
CG_RESIDUAL_TOL = 1e-10


def conjugate_gradient(
    matvec: Callable[[jax.Array], jax.Array],
    b: jax.Array,
    *,
    iters: int = 10,
    residual_tol: float = CG_RESIDUAL_TOL,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Approximately solves A x = b for symmetric positive-definite A given only v ↦ A v.

  Standard conjugate gradient from x₀ = 0 (r₀ = p₀ = b):
    α = rᵀr / pᵀAp;  x ← x + α p;  r ← r − α A p;  p ← r + (r'ᵀr' / rᵀr) p
  for at most `iters` iterations, stopping early once rᵀr < `residual_tol` (a `lax.while_loop`,
  so it is jit-able). Divisions by zero (b = 0, exact convergence) give 0, never NaN.

  Args:
    matvec: v ↦ A v on 1-D arrays of b's shape and dtype.
    b: [N] right-hand side.
    iters: maximum number of iterations (≥ 1).
    residual_tol: stop when the squared residual norm falls below it (default 1e-10).

  Returns:
    (x [N], residual_norm = ‖r‖ of CG's recursive residual b − A x, iterations run).

  Example:
    >>> x, res, n = conjugate_gradient(lambda v: a @ v, b, iters=20)
  """

  def cond(carry):
    i, _, _, _, rr = carry
    return (i < iters) & (rr >= residual_tol)

  def body(carry):
    i, x, r, p, rr = carry
    ap = matvec(p)
    alpha = safe_divide(rr, jnp.vdot(p, ap))
    x = x + alpha * p
    r = r - alpha * ap
    rr_new = jnp.vdot(r, r)
    p = r + safe_divide(rr_new, rr) * p
    return i + 1, x, r, p, rr_new

  init = (jnp.asarray(0, jnp.int32), jnp.zeros_like(b), b, b, jnp.vdot(b, b))
  n, x, _, _, rr = jax.lax.while_loop(cond, body, init)
  return x, jnp.sqrt(rr), n


def fisher_vector_product(
    kl_flat: Callable[[jax.Array], jax.Array], theta: jax.Array, *, damping: float
) -> Callable[[jax.Array], jax.Array]:
  """v ↦ (∇²KL(θ) + damping·I) v by forward-over-reverse differentiation (F is never formed).

  At θ = θ_old the Hessian of KL(π_old‖π_θ) is the Fisher information matrix. Each product is
  one `jax.jvp` of `jax.grad(kl_flat)` (about the cost of two backward passes).
  """
  grad_kl = jax.grad(kl_flat)

  def matvec(v: jax.Array) -> jax.Array:
    return jax.jvp(grad_kl, (theta,), (v,))[1] + damping * v

  return matvec


def _check_options(max_kl, cg_iters, cg_damping, backtrack_iters, backtrack_ratio) -> None:
  check_positive("max_kl", max_kl)
  if not isinstance(cg_iters, int) or cg_iters < 1:
    raise ValueError(f"`cg_iters` must be an int >= 1; got {cg_iters!r}.")
  if not cg_damping >= 0:
    raise ValueError(f"`cg_damping` must be >= 0; got {cg_damping!r}.")
  if not isinstance(backtrack_iters, int) or backtrack_iters < 1:
    raise ValueError(f"`backtrack_iters` must be an int >= 1; got {backtrack_iters!r}.")
  if not 0 < backtrack_ratio < 1:
    raise ValueError(f"`backtrack_ratio` must be in (0, 1); got {backtrack_ratio!r}.")


def _flat_functions(params, dtype):
  """(θ as a flat `dtype` vector, flat ↦ pytree with each leaf in its original dtype)."""
  flat, unravel = ravel_pytree(params)
  ravel_dtype = flat.dtype

  def to_params(v: jax.Array):
    tree = unravel(v.astype(ravel_dtype))
    return jax.tree.map(lambda leaf, ref: leaf.astype(jnp.result_type(ref)), tree, params)

  return flat.astype(dtype), to_params


def _line_search(loss_at, kl_at, loss_before, *, max_kl, backtrack_iters, backtrack_ratio):
  """First j in [0, backtrack_iters) with loss(ratio^j) < loss_before and KL ≤ max_kl.

  Returns (accepted, fraction = ratio^j or 0, trials made, loss, kl) — loss_before and 0 when
  no trial is accepted.
  """

  def cond(carry):
    j, accepted, _, _ = carry
    return (j < backtrack_iters) & ~accepted

  def body(carry):
    j, _, _, _ = carry
    fraction = jnp.asarray(backtrack_ratio, loss_before.dtype) ** j
    loss, kl = loss_at(fraction), kl_at(fraction)
    ok = jnp.isfinite(loss) & jnp.isfinite(kl) & (loss < loss_before) & (kl <= max_kl)
    return j + 1, ok, loss, kl

  zero = jnp.zeros((), loss_before.dtype)
  init = (jnp.asarray(0, jnp.int32), jnp.asarray(False), zero, zero)
  trials, accepted, loss, kl = jax.lax.while_loop(cond, body, init)
  fraction = jnp.where(accepted, jnp.asarray(backtrack_ratio, loss.dtype) ** (trials - 1), 0)
  loss = jnp.where(accepted, loss, loss_before)
  return accepted, fraction, trials, loss, jnp.where(accepted, kl, 0)


def trpo_step(
    loss_fn: Callable,
    kl_fn: Callable,
    params,
    *,
    max_kl: float = 0.01,
    cg_iters: int = 10,
    cg_damping: float = 0.1,
    backtrack_iters: int = 10,
    backtrack_ratio: float = 0.8,
    cg_residual_tol: float = CG_RESIDUAL_TOL,
):
  """One TRPO update: natural-gradient step scaled to the KL radius, then a line search.

  The loss is *minimised* (pass the negated surrogate advantage, e.g.
  −mean(exp(logp_θ − logp_old)·A)). With θ the flattened params, g = ∇loss(θ) and
  F = ∇²kl_fn(θ) + cg_damping·I (the Fisher matrix at θ = θ_old, damped):
    1. x ≈ F⁻¹(−g) by `cg_iters` steps of conjugate gradient on Fisher-vector products
       (`jax.jvp` of `jax.grad(kl_fn)`, forward over reverse; F is never formed);
    2. full step s = sqrt(2·max_kl / xᵀFx) · x, so that the quadratic model ½ sᵀFs = max_kl;
    3. backtracking: for j = 0 … backtrack_iters−1, θ' = θ + backtrack_ratio^j · s is accepted
       at the first j where loss(θ') < loss(θ) and kl_fn(θ') ≤ max_kl (and both are finite);
       if none is, the original params are returned unchanged.
  This is Spinning Up's `trpo` (its defaults: delta=0.01, damping_coeff=0.1, cg_iters=10,
  backtrack_iters=10, backtrack_coeff=0.8), except that improvement is strict here (Spinning Up
  accepts loss_new ≤ loss_old), so a zero gradient returns the params unchanged. Baselines'
  `trpo_mpi` uses cg_damping=1e-2, halves the step (backtrack_ratio=0.5) and allows KL up to
  1.5·max_kl; pass those values to reproduce its step sizes.

  Numerics: CG and the line search run in `promote_types(param dtype, float32)`; the returned
  params keep each leaf's dtype and the pytree structure. A zero gradient gives a zero step
  (no NaN) and the original params. `kl_fn` must be ≈ 0 with zero gradient at `params`.

  Args:
    loss_fn: params ↦ scalar surrogate loss to minimise (closes over the batch).
    kl_fn: params ↦ scalar mean KL(π_old‖π_θ) over the batch, π_old fixed at `params`
      (e.g. `kl_from_logits(stop_gradient(old_logits), logits(params)).mean()`).
    params: any pytree of float arrays (θ_old).
    max_kl: trust-region radius δ (default 0.01, Spinning Up's `delta`).
    cg_iters: conjugate-gradient iterations (default 10, Spinning Up and Baselines).
    cg_damping: λ added to the Fisher diagonal (default 0.1, Spinning Up; Baselines 1e-2).
    backtrack_iters: line-search trials (default 10, Spinning Up and Baselines).
    backtrack_ratio: step shrink factor per trial (default 0.8, Spinning Up; Baselines 0.5).
    cg_residual_tol: CG stops early when the squared residual falls below it (1e-10,
      Baselines' `residual_tol`).

  Returns:
    (new_params, metrics) with scalar metrics:
      loss_before, loss_after (= loss_before when rejected), kl (KL at the accepted params,
      0 when rejected), accepted (1.0/0.0), step_fraction (backtrack_ratio^j, 0 when
      rejected), backtracks (trials made), expected_improvement (−gᵀs, the first-order loss
      decrease of the full step), grad_norm (‖g‖), cg_residual (‖−g − F x‖ of CG's
      recursion), cg_iterations.

  Example:
    >>> def step(params, batch):
    ...   loss_fn = lambda p: surrogate_loss(p, batch)    # −mean(ratio · advantages)
    ...   old_logits = jax.lax.stop_gradient(policy_logits(params, batch))
    ...   kl_fn = lambda p: kl_from_logits(old_logits, policy_logits(p, batch)).mean()
    ...   return trpo_step(loss_fn, kl_fn, params, max_kl=0.01)
    >>> new_params, metrics = jax.jit(step)(params, batch)
  """
  _check_options(max_kl, cg_iters, cg_damping, backtrack_iters, backtrack_ratio)
  if not jax.tree.leaves(params):
    raise ValueError("`params` has no array leaves; there is nothing to update.")
  theta, to_params = _flat_functions(params, compute_dtype(*jax.tree.leaves(params)))
  dtype = theta.dtype
  loss_flat = lambda v: jnp.asarray(loss_fn(to_params(v)), dtype)  # noqa: E731
  kl_flat = lambda v: jnp.asarray(kl_fn(to_params(v)), dtype)  # noqa: E731

  loss_before, grad = jax.value_and_grad(loss_flat)(theta)
  fvp = fisher_vector_product(kl_flat, theta, damping=cg_damping)
  direction, cg_residual, cg_iterations = conjugate_gradient(
      fvp, -grad, iters=cg_iters, residual_tol=cg_residual_tol
  )
  quad = jnp.vdot(direction, fvp(direction))  # xᵀFx
  scale = jnp.sqrt(safe_divide(jnp.asarray(2 * max_kl, dtype), quad))
  full_step = scale * direction

  accepted, fraction, trials, loss_after, kl = _line_search(
      lambda f: loss_flat(theta + f * full_step),
      lambda f: kl_flat(theta + f * full_step),
      loss_before,
      max_kl=max_kl,
      backtrack_iters=backtrack_iters,
      backtrack_ratio=backtrack_ratio,
  )
  new_theta = jnp.where(accepted, theta + fraction * full_step, theta)
  metrics = {
      "loss_before": loss_before,
      "loss_after": loss_after,
      "kl": kl,
      "accepted": accepted.astype(dtype),
      "step_fraction": fraction,
      "backtracks": trials.astype(dtype),
      "expected_improvement": -jnp.vdot(grad, full_step),
      "grad_norm": jnp.linalg.norm(grad),
      "cg_residual": cg_residual,
      "cg_iterations": cg_iterations.astype(dtype),
  }
  return to_params(new_theta), metrics
