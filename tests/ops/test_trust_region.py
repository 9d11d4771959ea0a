"""TRPO step: CG, Fisher-vector products and the line search against dense numpy computations.

The test problem is a softmax policy over A actions with logits z_s = x_s W + b for S states, a
PPO-style surrogate loss −mean(exp(logp − logp_old)·adv) and the mean KL(π_old‖π_θ).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.ops.kl import kl_from_logits
from rljax.ops.trust_region import conjugate_gradient, fisher_vector_product, trpo_step

S, D, A = 6, 3, 5
N_PARAMS = D * A + A


# ---- the test problem and its dense numpy counterparts ----


def _data(seed, dtype=np.float64):
  rng = np.random.default_rng(seed)
  X = rng.normal(size=(S, D)).astype(dtype)
  params = {
      "W": (0.5 * rng.normal(size=(D, A))).astype(dtype),
      "b": (0.1 * rng.normal(size=A)).astype(dtype),
  }
  actions = rng.integers(0, A, size=S)
  adv = rng.normal(size=S).astype(dtype)
  return X, params, actions, adv


def _logits(params, X):
  return X @ params["W"] + params["b"]


def _problem(X, params, actions, adv):
  """(loss_fn, kl_fn) closed over the batch, π_old = the policy at `params`."""
  old_logits = jax.lax.stop_gradient(_logits(params, X))
  old_logp = jnp.take_along_axis(jax.nn.log_softmax(old_logits), actions[:, None], 1)[:, 0]

  def loss_fn(p):
    logp = jnp.take_along_axis(jax.nn.log_softmax(_logits(p, X)), actions[:, None], 1)[:, 0]
    return -jnp.mean(jnp.exp(logp - old_logp) * adv)

  def kl_fn(p):
    return jnp.mean(kl_from_logits(old_logits, _logits(p, X)))

  return loss_fn, kl_fn


def np_flat(params):  # ravel_pytree order: dict keys sorted ("W" row-major, then "b")
  return np.concatenate([np.ravel(params["W"]), np.ravel(params["b"])]).astype(np.float64)


def np_softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def np_jacobian(x):
  """dz/dθ for z_k = Σ_i x_i W_ik + b_k, θ = (W row-major, b)."""
  J = np.zeros((A, N_PARAMS))
  for k in range(A):
    for i in range(D):
      J[k, i * A + k] = x[i]
    J[k, D * A + k] = 1.0
  return J


def np_fisher(X, params):
  """(1/S) Σ_s J_sᵀ (diag p_s − p_s p_sᵀ) J_s: the Hessian of the mean KL at θ_old."""
  F = np.zeros((N_PARAMS, N_PARAMS))
  for s in range(S):
    p = np_softmax(X[s] @ params["W"] + params["b"])
    J = np_jacobian(X[s])
    F += J.T @ (np.diag(p) - np.outer(p, p)) @ J
  return F / S


def np_surrogate_grad(X, params, actions, adv):
  """∇θ of −mean(ratio·adv) at θ_old (ratio = 1): −(1/S) Σ_s adv_s J_sᵀ (e_{a_s} − p_s)."""
  g = np.zeros(N_PARAMS)
  for s in range(S):
    p = np_softmax(X[s] @ params["W"] + params["b"])
    onehot = np.eye(A)[actions[s]]
    g -= adv[s] * np_jacobian(X[s]).T @ (onehot - p) / S
  return g


def np_natural_step(X, params, actions, adv, *, max_kl, damping):
  F = np_fisher(X, params) + damping * np.eye(N_PARAMS)
  x = np.linalg.solve(F, -np_surrogate_grad(X, params, actions, adv))
  return np.sqrt(2 * max_kl / (x @ F @ x)) * x


# ---- conjugate gradient and Fisher-vector products ----


def test_conjugate_gradient_matches_dense_solve(x64):
  rng = np.random.default_rng(0)
  M = rng.normal(size=(8, 8))
  A_spd = M @ M.T + 0.5 * np.eye(8)
  b = rng.normal(size=8)
  x, residual, iterations = jax.jit(
      lambda b: conjugate_gradient(lambda v: A_spd @ v, b, iters=30, residual_tol=1e-24)
  )(b)
  np.testing.assert_allclose(x, np.linalg.solve(A_spd, b), atol=1e-8)
  assert float(residual) < 1e-10 and int(iterations) <= 30
  # b = 0: converged before the first iteration, x = 0, no NaN.
  x0, r0, n0 = conjugate_gradient(lambda v: A_spd @ v, np.zeros(8), iters=5)
  np.testing.assert_array_equal(x0, np.zeros(8))
  assert float(r0) == 0.0 and int(n0) == 0


def test_fisher_vector_product_matches_dense_hessian(x64):
  X, params, actions, adv = _data(1)
  _, kl_fn = _problem(X, params, actions, adv)
  theta, unravel = jax.flatten_util.ravel_pytree(params)
  kl_flat = lambda v: kl_fn(unravel(v))  # noqa: E731
  hessian = jax.jit(jax.hessian(kl_flat))(theta)
  np.testing.assert_allclose(hessian, np_fisher(X, params), atol=1e-10)  # Hessian == Fisher
  fvp = jax.jit(fisher_vector_product(kl_flat, theta, damping=0.1))
  v = np.random.default_rng(2).normal(size=N_PARAMS)
  damped = np_fisher(X, params) + 0.1 * np.eye(N_PARAMS)
  np.testing.assert_allclose(fvp(v), damped @ v, atol=1e-10)


# ---- the full step ----


def _step(X, params, actions, adv, **options):
  loss_fn, kl_fn = _problem(X, params, actions, adv)
  return trpo_step(loss_fn, kl_fn, params, **options)


_jit_step = jax.jit(_step, static_argnames=(
    "max_kl", "cg_iters", "cg_damping", "backtrack_iters", "backtrack_ratio", "cg_residual_tol"))


def test_step_is_the_dense_natural_gradient_step(x64):
  damping = 0.05
  X, params, actions, adv = _data(3)
  options = dict(max_kl=1e-4, cg_damping=damping, cg_iters=3 * N_PARAMS, cg_residual_tol=1e-28)
  new_params, metrics = _jit_step(X, params, actions, adv, **options)
  assert float(metrics["accepted"]) == 1.0 and float(metrics["step_fraction"]) == 1.0
  step = np_natural_step(X, params, actions, adv, max_kl=1e-4, damping=damping)
  expected = np_flat(params) + step
  np.testing.assert_allclose(np_flat(new_params), expected, atol=1e-8)
  np.testing.assert_allclose(
      metrics["grad_norm"], np.linalg.norm(np_surrogate_grad(X, params, actions, adv)), atol=1e-10
  )


def test_step_kl_is_close_to_max_kl_and_loss_decreases(x64):
  X, params, actions, adv = _data(0)
  max_kl = 1e-3
  new_params, metrics = _jit_step(
      X, params, actions, adv, max_kl=max_kl, cg_damping=1e-3, cg_iters=3 * N_PARAMS
  )
  loss_fn, kl_fn = _problem(X, params, actions, adv)
  assert float(metrics["accepted"]) == 1.0 and float(metrics["step_fraction"]) == 1.0
  kl = float(metrics["kl"])
  np.testing.assert_allclose(kl, float(kl_fn(new_params)), rtol=1e-10)
  step = np_flat(new_params) - np_flat(params)
  quadratic = 0.5 * step @ np_fisher(X, params) @ step
  assert abs(kl - quadratic) < 0.05 * quadratic  # the quadratic model of the KL holds
  assert 0.85 * max_kl < kl <= max_kl
  assert float(metrics["loss_after"]) < float(metrics["loss_before"])
  np.testing.assert_allclose(metrics["loss_after"], float(loss_fn(new_params)), rtol=1e-10)
  np.testing.assert_allclose(metrics["loss_before"], float(loss_fn(params)), rtol=1e-10)
  assert float(metrics["expected_improvement"]) > 0


def test_jit_matches_eager():
  X, params, actions, adv = _data(4, dtype=np.float32)
  eager_params, eager_metrics = _step(X, params, actions, adv)
  jit_params, jit_metrics = _jit_step(X, params, actions, adv)
  for key in ("W", "b"):
    assert jit_params[key].dtype == jnp.float32
    np.testing.assert_allclose(jit_params[key], eager_params[key], atol=1e-5)
  for key, value in eager_metrics.items():
    np.testing.assert_allclose(jit_metrics[key], value, rtol=1e-4, atol=1e-6, err_msg=key)


def np_backtrack(g, delta_norm_sq, *, max_kl, c, ratio, iters):
  """Line search on loss(θ0 + f·s) = f·gᵀs, KL = ½f²|s|² + c·f⁴|s|⁴, first f with KL ≤ max_kl."""
  for j in range(iters):
    f = ratio**j
    kl = 0.5 * f**2 * delta_norm_sq + c * f**4 * delta_norm_sq**2
    if f * g < 0 and kl <= max_kl:
      return j + 1, f
  return iters, 0.0


@pytest.mark.parametrize("c", [5.0, 50.0, 400.0, 1e5])  # accepted at trials 2, 3, 5; never
def test_line_search_backtracks_like_a_numpy_loop(x64, c):
  """F = I at θ0 (so CG is exact) and a quartic KL that rejects the first fractions."""
  theta0 = np.array([0.3, -1.0, 2.0, 0.5])
  g = np.array([1.0, -2.0, 0.5, 0.0])
  max_kl, damping, ratio = 0.01, 0.0, 0.8

  def kl_fn(theta):
    d2 = jnp.sum(jnp.square(theta - theta0))
    return 0.5 * d2 + c * d2**2

  loss_fn = lambda theta: jnp.dot(g, theta - theta0)  # noqa: E731
  options = dict(max_kl=max_kl, cg_damping=damping, backtrack_ratio=ratio)
  new, metrics = jax.jit(lambda t: trpo_step(loss_fn, kl_fn, t, **options))(theta0)
  full_step = -g * np.sqrt(2 * max_kl / (g @ g))  # F = I: x = −g, s = sqrt(2δ/xᵀx)·x
  trials, fraction = np_backtrack(
      g @ full_step, full_step @ full_step, max_kl=max_kl, c=c, ratio=ratio, iters=10
  )
  assert float(metrics["backtracks"]) == trials
  np.testing.assert_allclose(metrics["step_fraction"], fraction, rtol=1e-12)
  np.testing.assert_allclose(new, theta0 + fraction * full_step, atol=1e-12)
  assert float(metrics["accepted"]) == (fraction > 0)


def test_no_improving_step_returns_the_original_params(x64):
  X, params, actions, adv = _data(5)
  # (a) zero advantages: the loss is constant, the gradient and the step are 0.
  new_params, metrics = _jit_step(X, params, actions, np.zeros(S))
  for key in ("W", "b"):
    np.testing.assert_array_equal(new_params[key], params[key])
  assert float(metrics["accepted"]) == 0.0 and float(metrics["step_fraction"]) == 0.0
  assert float(metrics["loss_after"]) == float(metrics["loss_before"])
  assert all(np.isfinite(float(v)) for v in metrics.values())
  # (b) a loss that rises along every trial step (steep curvature around θ_old).
  loss_fn, kl_fn = _problem(X, params, actions, adv)
  theta0 = np_flat(params)

  def steep_loss(p):
    d = jax.flatten_util.ravel_pytree(p)[0] - theta0
    return loss_fn(p) + 1e6 * jnp.sum(jnp.square(d))

  new_params, metrics = jax.jit(lambda p: trpo_step(steep_loss, kl_fn, p))(params)
  np.testing.assert_array_equal(np_flat(new_params), theta0)
  assert float(metrics["accepted"]) == 0.0 and float(metrics["backtracks"]) == 10
  assert float(metrics["kl"]) == 0.0


def test_mixed_dtype_pytree_keeps_structure_and_dtypes():
  params = {
      "a": jnp.asarray([0.1, -0.2, 0.3], jnp.float32),
      "b": jnp.asarray([0.5, 1.0], jnp.bfloat16),
  }
  target = jnp.asarray([1.0, 0.0, -1.0, 2.0, 0.0], jnp.float32)

  def flat(p):
    return jnp.concatenate([p["a"].astype(jnp.float32), p["b"].astype(jnp.float32)])

  theta0 = flat(params)
  loss_fn = lambda p: jnp.sum(jnp.square(flat(p) - target))  # noqa: E731
  kl_fn = lambda p: 0.5 * jnp.sum(jnp.square(flat(p) - theta0))  # noqa: E731
  new_params, metrics = jax.jit(lambda p: trpo_step(loss_fn, kl_fn, p, max_kl=0.05))(params)
  assert jax.tree.structure(new_params) == jax.tree.structure(params)
  assert new_params["a"].dtype == jnp.float32 and new_params["b"].dtype == jnp.bfloat16
  assert float(metrics["accepted"]) == 1.0
  assert float(metrics["loss_after"]) < float(metrics["loss_before"])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_step_either_improves_within_the_region_or_is_rejected(seed):
  X, params, actions, adv = _data(seed, dtype=np.float32)
  new_params, metrics = _jit_step(X, params, actions, adv)
  loss_fn, kl_fn = _problem(X, params, actions, adv)
  if float(metrics["accepted"]):
    assert float(metrics["loss_after"]) < float(metrics["loss_before"])
    assert 0 <= float(metrics["kl"]) <= 0.01
    np.testing.assert_allclose(float(kl_fn(new_params)), float(metrics["kl"]), rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(float(loss_fn(new_params)), float(metrics["loss_after"]), rtol=1e-4)
  else:
    np.testing.assert_array_equal(np_flat(new_params), np_flat(params))


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(max_kl=0.0), "max_kl"),
        (dict(cg_iters=0), "cg_iters"),
        (dict(cg_damping=-0.1), "cg_damping"),
        (dict(backtrack_iters=0), "backtrack_iters"),
        (dict(backtrack_ratio=1.0), "backtrack_ratio"),
        (dict(backtrack_ratio=0.0), "backtrack_ratio"),
    ],
)
def test_bad_options(options, name):
  X, params, actions, adv = _data(0, dtype=np.float32)
  with pytest.raises(ValueError, match=name):
    _step(X, params, actions, adv, **options)


def test_empty_params():
  with pytest.raises(ValueError, match="params"):
    trpo_step(lambda p: 0.0, lambda p: 0.0, {})
