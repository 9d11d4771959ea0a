"""Policy-gradient losses: REINFORCE, PPO (clip, penalty, ptx), GRPO, GSPO and CISPO.

Shared conventions (see docs/architecture.md):
  * `logp`, `old_logp`, `ref_logp`, `mask`: [B, T]; `advantages`: [B] (one per sequence,
    broadcast over its tokens) or [B, T].
  * `old_logp`, `ref_logp` and `advantages` are wrapped in `stop_gradient`: only `logp` carries
    gradient.
  * Importance ratios are r = exp(clip(logp − old_logp, −20, 20)) (`LOG_RATIO_CLAMP`); the clip
    keeps every value finite for log-ratios of ±100 (its gradient is 0 beyond the clip).
  * Per-token losses are reduced by `aggregate(loss_mat, mask, agg)`; diagnostics (`clipfrac`,
    `approx_kl`, `ratio_mean`, …) are token means over the mask, whatever `agg` is.
  * Masked positions are never read: every [B, T] input is 0 there (`where_valid`) before
    anything is computed from it, so garbage under mask 0 (NaN, ±inf) changes neither the loss,
    the metrics nor the gradient.
  * Packed rows: `segment_ids` [B, T] (each token's sequence index) and their static count
    `num_segments` make every per-sequence quantity (the seq-mean aggregations, GSPO's sequence
    ratio) run over sequences instead of rows (`aggregate`).
  * Every loss returns `(loss, metrics)`, ready for `jax.value_and_grad(..., has_aux=True)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rljax.ops._checks import (
    LOG_RATIO_CLAMP,
    check_arrays,
    check_ndim,
    check_nonnegative,
    check_positive,
    check_same_shape,
    clamped_exp,
    compute_dtype,
    where_valid,
)
from rljax.ops.kl import kl_penalty
from rljax.ops.masking import aggregate, masked_mean, safe_divide, sequence_sums

Metrics = dict[str, jax.Array]


def _token_advantages(advantages, logp, mask) -> jax.Array:
  """Stop-gradient advantages as [B, T], 0 where masked: a [B] array is broadcast over each
  row's tokens."""
  check_ndim("advantages", advantages, (1, 2))
  a = jax.lax.stop_gradient(jnp.asarray(advantages))
  if a.ndim == 1:
    if a.shape[0] != jnp.shape(logp)[0]:
      raise ValueError(
          f"`advantages` has shape {a.shape} but `logp` has shape {jnp.shape(logp)}; a "
          "per-sequence advantage must have shape [B]."
      )
    a = jnp.broadcast_to(a[:, None], jnp.shape(logp))
  check_same_shape(logp=logp, advantages=a)
  return where_valid(a, mask).astype(compute_dtype(logp, a))


def _valid(mask, *arrays) -> tuple:
  """The [B, T] inputs with 0 at masked positions (`where_valid`; None stays None): what a
  loss computes from, so garbage there never reaches its value, metrics or gradient."""
  return tuple(None if x is None else where_valid(x, mask) for x in arrays)


def _log_ratio(logp, old_logp) -> jax.Array:
  """log π_θ − log π_old in at least float32, with the old log-probs stop-gradient."""
  dtype = compute_dtype(logp, old_logp)
  return logp.astype(dtype) - jax.lax.stop_gradient(old_logp).astype(dtype)


def _clip_bounds(clip_eps: float, clip_eps_high: float | None) -> tuple[float, float]:
  check_positive("clip_eps", clip_eps)
  high = clip_eps if clip_eps_high is None else clip_eps_high
  check_positive("clip_eps_high", high)
  return 1.0 - clip_eps, 1.0 + high


def clipped_surrogate(ratio, advantages, low: float, high: float):
  """Per-token PPO surrogate max(−A·r, −A·clip(r, low, high)) and where the clip is active.

  Returns:
    (loss_mat, clipped) with `clipped` a bool [B, T] marking tokens whose clipped term is the
    larger one (their gradient is 0).
  """
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, low, high)
  return jnp.maximum(unclipped, clipped), clipped > unclipped


def _k3_of_log_ratio(log_ratio) -> jax.Array:
  """(r − 1) − log r with r = exp(log_ratio): the non-negative k3 estimate of KL(π_old‖π_θ)."""
  return clamped_exp(log_ratio) - 1.0 - jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def policy_gradient_loss(logp, advantages, mask, *, agg: str = "token-mean", segment_ids=None,
                         num_segments: int | None = None):
  """REINFORCE / vanilla policy gradient: L = agg(−A · log π_θ).

  ∇L = −agg(A · ∇log π_θ), the score-function estimator (Williams, 1992). With A the
  reward-to-go this is REINFORCE; with a baseline subtracted, REINFORCE with baseline.

  Args:
    logp: [B, T] log-probs of the sampled tokens under the current policy.
    advantages: [B] or [B, T] advantages (stop-gradient).
    mask: [B, T] response mask.
    agg: aggregation mode of `aggregate` (default "token-mean").

  Returns:
    (loss, metrics) with metrics `advantage_mean` and `logp_mean` (token means).

  Example:
    >>> loss, metrics = policy_gradient_loss(logp, returns - baseline, mask)
  """
  check_arrays(2, logp=logp, mask=mask)
  adv = _token_advantages(advantages, logp, mask)
  logp = where_valid(logp, mask)
  loss = aggregate(-adv * logp.astype(adv.dtype), mask, agg, segment_ids=segment_ids,
                   num_segments=num_segments)
  return loss, {
      "advantage_mean": masked_mean(adv, mask),
      "logp_mean": jax.lax.stop_gradient(masked_mean(logp, mask)),
  }


def _ratio_metrics(log_ratio, ratio, clipped, mask) -> Metrics:
  log_ratio, ratio = jax.lax.stop_gradient((log_ratio, ratio))
  return {
      "clipfrac": masked_mean(clipped, mask),
      "approx_kl": masked_mean(_k3_of_log_ratio(log_ratio), mask),
      "ratio_mean": masked_mean(ratio, mask),
  }


def ppo_clip_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    clip_ratio_c: float | None = None,
    agg: str = "token-mean", segment_ids=None, num_segments: int | None = None,
):
  """PPO clipped surrogate (Schulman et al., 2017), with clip-higher and dual-clip options.

  With r = exp(clip(logp − old_logp, ±20)) and ε_lo = clip_eps, ε_hi = clip_eps_high or clip_eps:
    ℓ = max(−A·r, −A·clip(r, 1 − ε_lo, 1 + ε_hi))
  Dual clip (Ye et al., 2020, as in verl) for A < 0: ℓ ← min(ℓ, −A·c) with c = clip_ratio_c > 1,
  which bounds the loss when r ≫ 1 on a negative advantage. L = agg(ℓ).

  Args:
    logp: [B, T] log-probs under the current policy (carries gradient).
    old_logp: [B, T] log-probs under the behaviour policy (stop-gradient).
    advantages: [B] or [B, T] (stop-gradient).
    mask: [B, T] response mask.
    clip_eps: lower clip ε (0.2, the PPO paper).
    clip_eps_high: upper clip ε; None uses `clip_eps` (DAPO's clip-higher uses 0.28).
    clip_ratio_c: dual-clip constant c > 1 (verl's default is 3.0); None disables it.
    agg: aggregation mode (default "token-mean").

  Returns:
    (loss, metrics): `clipfrac` (tokens where the ε-clip is active), `clipfrac_lower` (tokens
    where the dual clip is active), `approx_kl` (token mean of k3 = (r − 1) − log r, an estimate
    of KL(π_old‖π_θ) ≥ 0), `ratio_mean`.

  Example:
    >>> (loss, metrics), grads = jax.value_and_grad(
    ...     lambda p: ppo_clip_loss(logp_fn(p), old_logp, adv, mask), has_aux=True)(params)
  """
  check_arrays(2, logp=logp, old_logp=old_logp, mask=mask)
  low, high = _clip_bounds(clip_eps, clip_eps_high)
  adv = _token_advantages(advantages, logp, mask)
  log_ratio = _log_ratio(*_valid(mask, logp, old_logp))
  ratio = clamped_exp(log_ratio)
  loss_mat, clipped = clipped_surrogate(ratio, adv, low, high)
  dual_clipped = jnp.zeros_like(clipped)
  if clip_ratio_c is not None:
    if not clip_ratio_c > 1.0:
      raise ValueError(f"`clip_ratio_c` must be > 1 for dual clip; got {clip_ratio_c!r}.")
    bound = -adv * clip_ratio_c
    dual_clipped = (adv < 0) & (loss_mat > bound)
    loss_mat = jnp.where(adv < 0, jnp.minimum(loss_mat, bound), loss_mat)
  metrics = _ratio_metrics(log_ratio, ratio, clipped, mask)
  metrics["clipfrac_lower"] = masked_mean(dual_clipped, mask)
  return aggregate(loss_mat, mask, agg, segment_ids=segment_ids,
                   num_segments=num_segments), metrics


def ppo_penalty_loss(
    logp, old_logp, advantages, mask, *, beta: float, kl_kind: str = "k1", agg: str = "token-mean",
    segment_ids=None, num_segments: int | None = None,
):
  """PPO's KL-penalised surrogate (Schulman et al., 2017, §4): L = agg(−A·r + β·KL̂(π_old‖π_θ)).

  r = exp(clip(logp − old_logp, ±20)). KL̂ is a per-token estimate of KL(π_old‖π_θ) from tokens
  sampled from π_old, i.e. `kl_penalty` with d = old_logp − logp; its gradient flows into `logp`.
  Pair with `ppo_kl_controller` (halve/double β) or `adaptive_kl_controller` for β.

  Args:
    logp, old_logp, advantages, mask: as in `ppo_clip_loss`.
    beta: penalty coefficient β ≥ 0 (a Python float or a traced scalar from a KL controller).
    kl_kind: estimator of `kl_penalty`: "k1" (default; the paper's KL), "k2", "k3", "abs".
    agg: aggregation mode (default "token-mean").

  Returns:
    (loss, metrics): `kl` (token mean of the chosen estimate), `approx_kl`, `ratio_mean`,
    `clipfrac` (always 0; kept so PPO variants log the same keys).

  Example:
    >>> loss, m = ppo_penalty_loss(logp, old_logp, adv, mask, beta=kl_state.coef)
    >>> kl_state = ppo_kl_controller(1.0, target=0.01).update(kl_state, m["kl"], 1)
  """
  check_arrays(2, logp=logp, old_logp=old_logp, mask=mask)
  adv = _token_advantages(advantages, logp, mask)
  log_ratio = _log_ratio(*_valid(mask, logp, old_logp))
  ratio = clamped_exp(log_ratio)
  kl = kl_penalty(-log_ratio, jnp.zeros_like(log_ratio), kind=kl_kind, clamp=None)
  loss = aggregate(-adv * ratio + beta * kl, mask, agg, segment_ids=segment_ids,
                   num_segments=num_segments)
  metrics = _ratio_metrics(log_ratio, ratio, jnp.zeros(ratio.shape, bool), mask)
  metrics["kl"] = jax.lax.stop_gradient(masked_mean(kl, mask))
  return loss, metrics


def grpo_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    beta: float = 0.04,
    kl_kind: str = "k3",
    agg: str = "seq-mean-token-mean", segment_ids=None, num_segments: int | None = None,
):
  """GRPO objective (Shao et al., 2024, DeepSeekMath eq. 3): clipped surrogate + β·KL in the loss.

    ℓ_t = max(−A·r_t, −A·clip(r_t, 1 − ε_lo, 1 + ε_hi)) + β·KL̂_t(π_θ‖π_ref)
    L = agg(ℓ)           (the paper: "seq-mean-token-mean"; DAPO: "token-mean";
                          Dr. GRPO: "seq-mean-token-sum-norm")

  KL̂ is `kl_penalty(logp, ref_logp, kind=kl_kind)`; the paper uses k3 with β = 0.04 (TRL's
  default was 0.04 too). Advantages come from `grpo_advantages` (or `rloo_advantages`, …).

  Args:
    logp: [B, T] log-probs under the current policy.
    old_logp: [B, T] log-probs under the sampling policy (stop-gradient). Pass `logp` itself
      (it is stop-gradient'ed) for the single-update, on-policy case where r ≡ 1.
    ref_logp: [B, T] log-probs under the frozen reference (stop-gradient); may be None when
      beta == 0.
    advantages: [B] or [B, T] (stop-gradient).
    mask: [B, T] response mask.
    clip_eps, clip_eps_high: clip range (0.2; DAPO's clip-higher sets clip_eps_high=0.28).
    beta: KL coefficient (0.04, DeepSeekMath). 0 disables the KL term (DAPO, Dr. GRPO).
    kl_kind: `kl_penalty` estimator for the loss ("k3" by default; "k2" has the gradient of the
      true KL in expectation).
    agg: aggregation mode.

  Returns:
    (loss, metrics): `clipfrac`, `approx_kl`, `ratio_mean`, `kl` (token mean of KL̂ to the
    reference; 0 when beta == 0 and ref_logp is None).

  Example:
    >>> adv = grpo_advantages(scores, group_size=8)
    >>> loss, metrics = grpo_loss(logp, old_logp, ref_logp, adv, mask)
  """
  check_arrays(2, logp=logp, old_logp=old_logp, ref_logp=ref_logp, mask=mask)
  if ref_logp is None and beta != 0:
    raise ValueError("`ref_logp` is required when `beta` != 0.")
  low, high = _clip_bounds(clip_eps, clip_eps_high)
  adv = _token_advantages(advantages, logp, mask)
  logp, old_logp, ref_logp = _valid(mask, logp, old_logp, ref_logp)
  log_ratio = _log_ratio(logp, old_logp)
  ratio = clamped_exp(log_ratio)
  loss_mat, clipped = clipped_surrogate(ratio, adv, low, high)
  metrics = _ratio_metrics(log_ratio, ratio, clipped, mask)
  if ref_logp is None:
    metrics["kl"] = jnp.zeros((), loss_mat.dtype)
  else:
    kl = kl_penalty(logp.astype(loss_mat.dtype), ref_logp.astype(loss_mat.dtype), kind=kl_kind)
    loss_mat = loss_mat + beta * kl
    metrics["kl"] = jax.lax.stop_gradient(masked_mean(kl, mask))
  return aggregate(loss_mat, mask, agg, segment_ids=segment_ids,
                   num_segments=num_segments), metrics


def gspo_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    clip_eps: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    agg: str = "seq-mean-token-mean", segment_ids=None, num_segments: int | None = None,
):
  """GSPO: PPO clipping on the length-normalised sequence ratio (Zheng et al., 2025).

    s_b = exp( (1/|y_b|) Σ_t m_bt (logp_bt − old_logp_bt) )          (geometric-mean ratio)
    s_bt = sg[s_b] · π_θ(y_bt) / sg[π_θ(y_bt)]                       (GSPO-token: value s_b)
    ℓ_bt = max(−A·s_bt, −A·clip(s_bt, 1 − ε_lo, 1 + ε_hi)),  L = agg(ℓ)

  With the default "seq-mean-token-mean" and a sequence-level A, ∇L is the paper's sequence
  gradient s_b·A_b·mean_t ∇log π_θ(y_bt) (the GSPO-token form of verl's
  `compute_policy_loss_gspo`). The clip range 3e-4 / 4e-4 is the paper's. The log of s_b is
  clamped to ±20 before exp. Rows with no valid token get s_b = 1.

  Args:
    logp, old_logp, mask: [B, T]; advantages: [B] or [B, T] (stop-gradient).
    clip_eps, clip_eps_high: clip range around 1 for s_b.
    agg: aggregation mode (the paper's sequence objective is "seq-mean-token-mean").

  Returns:
    (loss, metrics): `clipfrac` (token mean), `approx_kl`, `ratio_mean` (token mean of s_b),
    `seq_ratio_mean` (mean of s_b over rows with a valid token).

  Example:
    >>> loss, metrics = gspo_loss(logp, old_logp, grpo_advantages(scores, group_size=8), mask)
  """
  check_arrays(2, logp=logp, old_logp=old_logp, mask=mask)
  low, high = _clip_bounds(clip_eps, clip_eps_high)
  adv = _token_advantages(advantages, logp, mask)
  logp, old_logp = _valid(mask, logp, old_logp)
  log_ratio = _log_ratio(logp, old_logp)
  m = jnp.asarray(mask, log_ratio.dtype)
  sums, counts = sequence_sums(log_ratio, m, segment_ids, num_segments)
  seq_log_ratio = safe_divide(sums, counts)  # 0 for a sequence with no valid token
  if segment_ids is None:  # [B] → the tokens of each row; packed: [N] → each token's sequence
    token_seq_log_ratio = seq_log_ratio[:, None]
  else:
    token_seq_log_ratio = jnp.take(seq_log_ratio, segment_ids, mode="fill", fill_value=0.0)
  lp = logp.astype(log_ratio.dtype)
  token_log_ratio = lp - jax.lax.stop_gradient(lp) + jax.lax.stop_gradient(token_seq_log_ratio)
  ratio = clamped_exp(token_log_ratio)
  loss_mat, clipped = clipped_surrogate(ratio, adv, low, high)
  metrics = _ratio_metrics(log_ratio, ratio, clipped, mask)
  metrics["seq_ratio_mean"] = jax.lax.stop_gradient(masked_mean(clamped_exp(seq_log_ratio),
                                                                counts != 0))
  return aggregate(loss_mat, mask, agg, segment_ids=segment_ids,
                   num_segments=num_segments), metrics


def cispo_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float = 0.28,
    agg: str = "token-mean", segment_ids=None, num_segments: int | None = None,
):
  """CISPO: REINFORCE weighted by a clipped, stop-gradient importance ratio (MiniMax-M1, 2025).

    ℓ_t = −sg[clip(r_t, 1 − ε_lo, 1 + ε_hi)] · A · log π_θ(y_t),   L = agg(ℓ)

  Unlike PPO, clipped tokens still get gradient (only the weight is clipped), so rare
  high-ratio tokens keep contributing. The paper sets a large ε_lo (no lower clip) and tunes
  ε_hi; the defaults here (0.2 / 0.28) follow the DAPO clip range.

  Args:
    logp, old_logp, mask: [B, T]; advantages: [B] or [B, T] (stop-gradient).
    clip_eps, clip_eps_high: the clip range of the importance weight.
    agg: aggregation mode (default "token-mean", as the paper).

  Returns:
    (loss, metrics): `clipfrac` (tokens whose weight was clipped), `approx_kl`, `ratio_mean`.

  Example:
    >>> loss, metrics = cispo_loss(logp, old_logp, adv, mask)
  """
  check_arrays(2, logp=logp, old_logp=old_logp, mask=mask)
  low, high = _clip_bounds(clip_eps, clip_eps_high)
  adv = _token_advantages(advantages, logp, mask)
  logp, old_logp = _valid(mask, logp, old_logp)
  log_ratio = _log_ratio(logp, old_logp)
  ratio = clamped_exp(log_ratio)
  weight = jax.lax.stop_gradient(jnp.clip(ratio, low, high))
  loss_mat = -weight * adv * logp.astype(adv.dtype)
  clipped = (ratio < low) | (ratio > high)
  loss = aggregate(loss_mat, mask, agg, segment_ids=segment_ids, num_segments=num_segments)
  return loss, _ratio_metrics(log_ratio, ratio, clipped, mask)


def ppo_ptx_loss(rl_loss_and_metrics, ptx_logp, ptx_mask, *, ptx_coef: float, agg: str = "token-mean",
                 normalizer=None):
  """PPO-ptx (InstructGPT, Ouyang et al., 2022, eq. 2): RL loss + γ · pretraining NLL.

    L = L_RL + γ · agg(−log π_θ(x_t))   over tokens x of a pretraining (or SFT) batch

  Composes with any loss of this module: pass its `(loss, metrics)` pair.

  Args:
    rl_loss_and_metrics: the `(loss, metrics)` returned by e.g. `ppo_clip_loss`.
    ptx_logp: [B', T'] log-probs of the pretraining tokens under the current policy.
    ptx_mask: [B', T'] mask of the pretraining tokens.
    ptx_coef: γ ≥ 0 (InstructGPT used γ = 27.8 with its own loss scaling; tune it).
    agg: aggregation of the NLL (default "token-mean").
    normalizer: the outer denominator of `agg` over the FULL pretraining batch when this call
      sees one microbatch of it (as `aggregate`); None uses this batch's own.

  Returns:
    (loss, metrics) with `ptx_nll` (this batch's own `agg` of the NLL) and `rl_loss` added to
    the RL metrics.

  Example:
    >>> loss, metrics = ppo_ptx_loss(ppo_clip_loss(logp, old, adv, mask), ptx_logp, ptx_mask,
    ...                              ptx_coef=0.5)
  """
  rl_loss, metrics = rl_loss_and_metrics
  check_arrays(2, ptx_logp=ptx_logp, ptx_mask=ptx_mask)
  check_nonnegative("ptx_coef", ptx_coef)
  ptx_logp = where_valid(ptx_logp, ptx_mask)
  nll = aggregate(-ptx_logp, ptx_mask, agg, normalizer=normalizer)
  own = nll if normalizer is None else aggregate(-ptx_logp, ptx_mask, agg)
  metrics = dict(metrics, ptx_nll=jax.lax.stop_gradient(own), rl_loss=jax.lax.stop_gradient(rl_loss))
  return rl_loss + ptx_coef * nll, metrics
