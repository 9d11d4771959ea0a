"""KL divergence: per-token sample estimators and the exact full-vocabulary KL.

`kl_penalty` estimates KL(π‖π_ref) from the log-probs of tokens sampled from π (the estimators
of Schulman, "Approximating KL Divergence", 2020, http://joschu.net/blog/kl-approx.html, with the
names and clamps of verl's `kl_penalty`). `kl_from_logits` computes KL(p‖q) exactly from two sets
of logits over the whole vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rljax.ops._checks import (
    LOG_RATIO_CLAMP,
    check_choice,
    check_positive,
    check_same_shape,
    compute_dtype,
)

# Every accepted `kind`, mapped to its canonical estimator (verl's aliases included).
KL_KINDS = {
    "k1": "k1",
    "kl": "k1",
    "k2": "k2",
    "mse": "k2",
    "k3": "k3",
    "low_var_kl": "k3",
    "abs": "abs",
}


def _k1(d) -> jax.Array:
  return d


def _k2(d) -> jax.Array:
  return 0.5 * jnp.square(d)


def _k3(d, clamp: float | None) -> jax.Array:
  # expm1(-d) + d == exp(-d) - 1 + d, without the cancellation of exp(-d) - 1 near d = 0
  # (in float32 the naive form returns values down to -6e-8; this one stays >= 0).
  d = jnp.clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
  k3 = jnp.expm1(-d) + d
  if clamp is not None:
    k3 = jnp.clip(k3, -clamp, clamp)
  return k3


def _abs(d) -> jax.Array:
  return jnp.abs(d)


def kl_penalty(logp, ref_logp, *, kind: str = "k3", clamp: float | None = 10.0) -> jax.Array:
  """Per-token estimate of KL(π‖π_ref) from log-probs of tokens sampled from π.

  With d = logp − ref_logp (the log-ratio log π(y)/π_ref(y) of a token y ~ π):

    k1  = d                     unbiased for KL(π‖π_ref), high variance, can be negative
    k2  = d² / 2                biased (≥ 0), low variance
    k3  = exp(−d) − 1 + d       unbiased for KL(π‖π_ref), low variance, always ≥ 0
    abs = |d|

  k3 clips d to ±20 (`LOG_RATIO_CLAMP`) before the exponential and then clips the result to
  [−clamp, clamp]; this is verl's `low_var_kl` (`kl = ref − logp; kl = clamp(kl, −20, 20);
  kld = exp(kl) − kl − 1; clamp(kld, −10, 10)`), the same function written with −d, evaluated
  as expm1(−d) + d (exactly ≥ 0 in float32, where exp(−d) − 1 + d rounds down to −6e-8). k3 is
  unbiased where the clips are inactive. k1, k2 and abs are not clipped (as in verl), so they
  stay finite for any finite log-ratio.

  Where each estimator belongs (on-policy samples y ~ π, θ the parameters of π):
    * In the reward: k1. The per-token reward r_t − β·k1_t is treated as a constant by the
      policy gradient, and E[k1] = KL(π‖π_ref), so the penalised objective is exactly the
      KL-regularised one (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022; verl's
      `use_kl_in_reward` with `kl_penalty="kl"`).
    * In the loss: k3, as in GRPO (DeepSeekMath, Shao et al. 2024; verl's `kl_loss_type=
      "low_var_kl"`), or k2. Their gradients in expectation over y ~ π are
        E[∇k2] = E[d·∇log π(y)] = ∇ KL(π‖π_ref)            (the true KL gradient)
        E[∇k3] = E[(1 − π_ref/π)·∇log π(y)] = ∇ KL(π_ref‖π)  (the reverse KL's gradient)
      so k2 gives the true gradient of the forward KL, and k3 pulls π towards π_ref through the
      reverse KL (same minimiser, a different gradient).
    * k1 as a loss term has zero expected gradient on-policy: E[∇log π(y)] = 0, so it
      regularises nothing (it is still the right *value* to log as a metric).

  Gradients flow into `logp` only; `ref_logp` is wrapped in `jax.lax.stop_gradient`. Where a
  clip is active (|d| > 20 for k3, or k3 > clamp) the gradient is 0, as with verl's
  `torch.clamp`.

  Numerics: computed in `promote_types(dtype, float32)` (bf16 inputs give float32 results,
  float64 stays float64). Finite values and gradients for any finite log-ratio (±100 included).
  The estimate is elementwise and reads every entry: where masked entries may hold garbage
  (NaN, ±inf), select them first (`where_valid(x, mask)`), since a later mask keeps the value
  but not the gradient finite.

  Args:
    logp: [B, T] (any shape) log-probs of the sampled tokens under the policy π.
    ref_logp: same shape; log-probs of the same tokens under the reference policy.
    kind: "k1" (alias "kl"), "k2" ("mse"), "k3" ("low_var_kl", the default) or "abs".
    clamp: k3 only; the result is clipped to [−clamp, clamp] (default 10.0, verl's value);
      None skips that clip. The log-ratio is always clipped to ±20 before exp.

  Returns:
    [B, T] per-token KL estimates (mask and reduce them with `aggregate`).

  Example:
    >>> kl = kl_penalty(logp, ref_logp, kind="k3")          # [B, T], for the loss
    >>> loss = aggregate(kl, mask, "seq-mean-token-mean")
    >>> reward_kl = kl_penalty(logp, ref_logp, kind="k1")   # for the reward
  """
  check_choice("KL estimator `kind`", kind, KL_KINDS)
  check_same_shape(logp=logp, ref_logp=ref_logp)
  if clamp is not None:
    check_positive("clamp", clamp)
  dtype = compute_dtype(logp, ref_logp)
  ref = jax.lax.stop_gradient(jnp.asarray(ref_logp).astype(dtype))
  d = jnp.asarray(logp).astype(dtype) - ref
  estimator = KL_KINDS[kind]
  if estimator == "k1":
    return _k1(d)
  if estimator == "k2":
    return _k2(d)
  if estimator == "k3":
    return _k3(d, clamp)
  return _abs(d)


def kl_from_logits(p_logits, q_logits, *, temperature: float = 1.0) -> jax.Array:
  """Exact KL(p‖q) = Σ_v p_v (log p_v − log q_v) over the vocabulary, per position.

  p = softmax(p_logits / temperature), q = softmax(q_logits / temperature). Both log-softmaxes
  are computed in `promote_types(dtype, float32)` and the KL is formed from their difference,
  never from log(probabilities), so it is finite for logits of ±1e4 and when q gives a token
  probability ~0 (exp underflow) that p does not. Terms with p_v = 0 contribute 0 (0·log 0 = 0),
  so p_logits may also hold −inf for excluded tokens (values and gradients stay finite); −inf
  in q_logits where p_v > 0 gives +inf, the true value. Every per-token term is written in the
  non-negative form p·(δ + e^{−δ} − 1) (see `_kl_terms`), so the result is ≥ 0, exactly 0
  when p_logits == q_logits, and accurate for nearly equal distributions.

  Gradients flow into both arguments (this is the exact KL as a function of both
  distributions). When one side is fixed — the reference policy in KL(π‖π_ref), or π_old in
  TRPO's KL(π_old‖π_θ) — wrap it in `jax.lax.stop_gradient` yourself.

  Args:
    p_logits: [B, T, V] (any leading shape) logits of p, the distribution the expectation is
      taken under.
    q_logits: same shape; logits of q.
    temperature: both logits are divided by it (default 1.0, no scaling); must be > 0.

  Returns:
    [B, T] (the leading shape) KL(p‖q) per position, in `promote_types(dtype, float32)`.

  Example:
    >>> kl = kl_from_logits(policy_logits, jax.lax.stop_gradient(ref_logits))  # [B, T]
    >>> kl_loss = aggregate(kl, mask, "token-mean")
  """
  check_same_shape(p_logits=p_logits, q_logits=q_logits)
  if jnp.ndim(p_logits) < 1:
    raise ValueError(f"`p_logits` needs a vocabulary axis; got shape {jnp.shape(p_logits)}.")
  check_positive("temperature", temperature)
  dtype = compute_dtype(p_logits, q_logits)
  log_p = jax.nn.log_softmax(jnp.asarray(p_logits).astype(dtype) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(jnp.asarray(q_logits).astype(dtype) / temperature, axis=-1)
  return _kl_terms(log_p, log_q).sum(axis=-1)


def _kl_terms(log_p, log_q) -> jax.Array:
  """Per-token terms t_v = p_v·(δ_v + exp(−δ_v) − 1) = p_v·δ_v + q_v − p_v, δ = log p − log q.

  Summed over v they give KL(p‖q) (Σ q_v = Σ p_v = 1), and each term is ≥ 0, so the sum has
  no cancellation: near p = q the terms are p·δ²/2 to second order instead of differences of
  O(1e-7)-rounded log-probs. |δ| < 1 uses p·(expm1(−δ) + δ); elsewhere q − p + p·δ (no
  overflow of exp(−δ)). Both are the same function, so gradients and Hessians are unchanged.
  """
  p = jnp.exp(log_p)
  q = jnp.exp(log_q)
  support = p > 0
  # Double `where`: outside p's support (p_logits = -inf, or exp underflow) the term is its limit
  # q_v, and no NaN reaches the gradient through -inf log-probs.
  delta = jnp.where(support, log_p, 0) - jnp.where(support, log_q, 0)
  small = jnp.abs(delta) < 1
  delta_small = jnp.where(small, delta, 0)
  near = p * (jnp.expm1(-delta_small) + delta_small)
  far = (q - p) + p * delta
  return jnp.where(support, jnp.where(small, near, far), q)  # p_v = 0: the term is q_v
