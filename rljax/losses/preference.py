"""Preference losses beyond pairwise DPO: KTO, ORPO, SimPO and CPO.

Shared conventions (see docs/architecture.md and `rljax.losses.dpo`):
  * Inputs are `[B]` sequence-level log-probs; "avg" inputs are per-token means
    (`sequence_logprobs(token_logps, mask, average=True)`), the others sums.
  * Reference log-probs and KL anchors are stop-gradient; every computation runs in
    `promote_types(dtype, float32)`.
  * `chosen_nll` (ORPO, CPO) may be a scalar — TRL passes the token-mean cross-entropy of the
    chosen responses over the whole batch — or a `[B]` per-sequence NLL, which is averaged over
    the batch. Either way it carries gradient.
  * Every loss returns `(loss, metrics)`; metrics carry no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rljax.losses.dpo import Metrics, check_sequence_inputs, preference_metrics
from rljax.ops._checks import check_nonnegative, check_positive, compute_dtype
from rljax.ops.masking import safe_divide


def _cast(dtype, *arrays) -> tuple[jax.Array, ...]:
  return tuple(jnp.asarray(x).astype(dtype) for x in arrays)


def log1mexp(x) -> jax.Array:
  """log(1 − exp(x)) for x ≤ 0, accurate over the whole range (Mächler 2012).

  log(−expm1(x)) for x > −log 2, log1p(−exp(x)) otherwise. x is first clipped to at most −eps
  (the dtype's machine epsilon) so that x → 0⁻ (a response of probability ~1) gives a large but
  finite value, ≈ log(eps), and a finite gradient (0 beyond the clip) instead of −inf.

  Example:
    >>> log1mexp(jnp.array([-1e-3, -1.0, -50.0]))  # ≈ [-6.9083, -0.4587, -1.9e-22]
  """
  x = jnp.asarray(x)
  dtype = compute_dtype(x)
  x = jnp.minimum(x.astype(dtype), -jnp.finfo(dtype).eps)
  near_zero = x > -jnp.log(2.0).astype(dtype)
  # Each branch sees a safe argument so the unused one never produces NaN gradients.
  small = jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0)))
  large = jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x)))
  return jnp.where(near_zero, small, large)


def _mean_nll(chosen_nll, dtype, **reference) -> jax.Array:
  """The batch mean of a scalar or [B] NLL (whose shape must then match the named reference)."""
  nll = jnp.asarray(chosen_nll)
  if nll.ndim != 0:
    check_sequence_inputs(**reference, chosen_nll=nll)
  return jnp.mean(nll.astype(dtype))


def kto_loss(
    policy_logps,
    ref_logps,
    desirable,
    policy_kl_logps,
    ref_kl_logps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[jax.Array, Metrics]:
  """Kahneman–Tversky Optimization (Ethayarajh et al. 2024), as in TRL's `KTOTrainer`.

  With r_i = π_i − ref_i the log-ratio of example i and the reference point
    z = stop_gradient(max(mean_j(π^KL_j − ref^KL_j), 0))
  (the KL batch pairs each prompt with a mismatched completion), the per-example losses are
    desirable:    ℓ_i = 1 − σ(β·(r_i − z))
    undesirable:  ℓ_i = 1 − σ(β·(z − r_i))
  and the loss is their weighted mean over the whole batch,
    L = (1/B)·Σ_i w_i·ℓ_i,   w_i = desirable_weight if desirable_i else undesirable_weight,
  exactly TRL's `torch.cat((λ_D·chosen_losses, λ_U·rejected_losses)).mean()`: the weights scale
  terms but are not normalised (the KTO paper suggests λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]). A batch
  with no desirable (or no undesirable) example is legal and gives the mean over the others'
  weighted terms; the reward metric of the missing side is 0.

  Args:
    policy_logps: [B] policy log-prob (sum) of each completion.
    ref_logps: [B] reference log-prob of each completion (stop-gradient).
    desirable: [B] bool (or 0/1): True for a desirable completion, False for an undesirable one.
    policy_kl_logps: [B'] policy log-probs of the mismatched KL completions (stop-gradient).
    ref_kl_logps: [B'] reference log-probs of the same KL completions (stop-gradient).
    beta: β > 0 (0.1, TRL's default).
    desirable_weight: λ_D ≥ 0 (1.0).
    undesirable_weight: λ_U ≥ 0 (1.0).

  Returns:
    (loss, metrics) with metrics "kl" (z), "rewards_chosen" / "rewards_rejected" (mean β·r_i
    over the desirable / undesirable examples, 0 if there are none), "reward_margin" (their
    difference) and "desirable_fraction".

  Example:
    >>> loss, m = kto_loss(logp, ref_logp, labels, kl_logp, ref_kl_logp, beta=0.1)
  """
  check_positive("beta", beta)
  check_nonnegative("desirable_weight", desirable_weight)
  check_nonnegative("undesirable_weight", undesirable_weight)
  check_sequence_inputs(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
  check_sequence_inputs(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
  dtype = compute_dtype(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps)
  logp, ref, kl_logp, kl_ref = _cast(dtype, policy_logps, ref_logps, policy_kl_logps, ref_kl_logps)
  is_desirable = jnp.asarray(desirable) != 0
  z = jax.lax.stop_gradient(jnp.maximum(jnp.mean(kl_logp - kl_ref), 0.0))
  log_ratio = logp - jax.lax.stop_gradient(ref)
  # 1 − σ(β(r − z)) = σ(β(z − r)) and 1 − σ(β(z − r)) = σ(β(r − z)), without cancellation.
  per_example = jnp.where(
      is_desirable, jax.nn.sigmoid(beta * (z - log_ratio)), jax.nn.sigmoid(beta * (log_ratio - z))
  )
  weights = jnp.where(is_desirable, desirable_weight, undesirable_weight).astype(dtype)
  loss = jnp.mean(weights * per_example)

  rewards = jax.lax.stop_gradient(beta * log_ratio)
  d = is_desirable.astype(dtype)
  chosen = safe_divide(jnp.sum(d * rewards), jnp.sum(d))
  rejected = safe_divide(jnp.sum((1 - d) * rewards), jnp.sum(1 - d))
  metrics = {
      "kl": z,
      "rewards_chosen": chosen,
      "rewards_rejected": rejected,
      "reward_margin": chosen - rejected,
      "desirable_fraction": jnp.mean(d),
  }
  return loss, metrics


def orpo_loss(
    chosen_avg_logps, rejected_avg_logps, chosen_nll, *, beta: float = 0.1
) -> tuple[jax.Array, Metrics]:
  """Odds-Ratio Preference Optimization (Hong et al. 2024), as in TRL's `ORPOTrainer`.

  With a_c, a_r the average per-token log-probs and odds(p) = p / (1 − p):
    log_odds = log odds(e^{a_c}) − log odds(e^{a_r})
             = (a_c − a_r) − (log(1 − e^{a_c}) − log(1 − e^{a_r}))
    L = mean(chosen_nll) − β·mean(logσ(log_odds))
  log(1 − e^a) is `log1mexp` (stable as a → 0⁻; a is clipped to ≤ −eps there, see `log1mexp`).

  Args:
    chosen_avg_logps: [B] mean token log-prob of each chosen response (≤ 0).
    rejected_avg_logps: [B] mean token log-prob of each rejected response (≤ 0).
    chosen_nll: scalar or [B] NLL of the chosen responses (the SFT term; carries gradient).
    beta: λ of the paper (0.1, TRL's default), the weight of the odds-ratio term.

  Returns:
    (loss, metrics) with "nll", "log_odds_ratio" (mean logσ(log_odds)), "log_odds_chosen"
    (mean log_odds), and the `preference_metrics` of the rewards β·a_c, β·a_r (TRL's
    convention).

  Example:
    >>> loss, m = orpo_loss(avg_c, avg_r, nll, beta=0.1)
  """
  check_positive("beta", beta)
  check_sequence_inputs(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
  dtype = compute_dtype(chosen_avg_logps, rejected_avg_logps, chosen_nll)
  a_c, a_r = _cast(dtype, chosen_avg_logps, rejected_avg_logps)
  log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
  ratio = jax.nn.log_sigmoid(log_odds)
  nll = _mean_nll(chosen_nll, dtype, chosen_avg_logps=a_c)
  loss = nll - beta * jnp.mean(ratio)
  metrics = {
      "nll": jax.lax.stop_gradient(nll),
      "log_odds_ratio": jax.lax.stop_gradient(jnp.mean(ratio)),
      "log_odds_chosen": jax.lax.stop_gradient(jnp.mean(log_odds)),
      **preference_metrics(beta * a_c, beta * a_r),
  }
  return loss, metrics


def simpo_loss(
    chosen_avg_logps, rejected_avg_logps, *, beta: float = 2.0, gamma: float = 0.5
) -> tuple[jax.Array, Metrics]:
  """Simple Preference Optimization (Meng et al. 2024, eq. 6), reference-free.

    L = mean(−logσ(β·(a_c − a_r) − γ))

  γ is the target reward margin itself. TRL's `CPOTrainer` (`loss_type="simpo"`, `simpo_gamma`)
  computes the same −logσ(β·(a_c − a_r − γ/β)); the SimPO repository parameterises it by
  `gamma_beta_ratio` = γ/β — multiply that by β to get `gamma` here.

  Args:
    chosen_avg_logps: [B] mean token log-prob of each chosen response.
    rejected_avg_logps: [B] mean token log-prob of each rejected response.
    beta: β > 0 (2.0, the SimPO paper's default range 2.0–2.5).
    gamma: γ, the target margin (0.5; the paper uses 0.5–1.6).

  Returns:
    (loss, metrics) with the `preference_metrics` of the rewards β·a_c, β·a_r.

  Example:
    >>> loss, m = simpo_loss(avg_c, avg_r, beta=2.0, gamma=0.5)
  """
  check_positive("beta", beta)
  check_sequence_inputs(chosen_avg_logps=chosen_avg_logps, rejected_avg_logps=rejected_avg_logps)
  dtype = compute_dtype(chosen_avg_logps, rejected_avg_logps)
  a_c, a_r = _cast(dtype, chosen_avg_logps, rejected_avg_logps)
  loss = jnp.mean(-jax.nn.log_sigmoid(beta * (a_c - a_r) - gamma))
  return loss, preference_metrics(beta * a_c, beta * a_r)


def cpo_loss(
    chosen_logps, rejected_logps, chosen_nll, *, beta: float = 0.1, alpha: float = 1.0
) -> tuple[jax.Array, Metrics]:
  """Contrastive Preference Optimization (Xu et al. 2024), reference-free, as in TRL's CPOTrainer.

    L = mean(−logσ(β·(c − r))) + α·mean(chosen_nll)

  Args:
    chosen_logps: [B] policy log-prob of each chosen response (TRL uses sums).
    rejected_logps: [B] policy log-prob of each rejected response.
    chosen_nll: scalar or [B] NLL of the chosen responses (the behaviour-cloning term).
    beta: β > 0 (0.1, TRL's default).
    alpha: α ≥ 0, weight of the NLL term (1.0, TRL's `cpo_alpha` and the paper).

  Returns:
    (loss, metrics) with "nll", "preference_loss" and the `preference_metrics` of the rewards
    β·c, β·r.

  Example:
    >>> loss, m = cpo_loss(logp_c, logp_r, nll, beta=0.1, alpha=1.0)
  """
  check_positive("beta", beta)
  check_nonnegative("alpha", alpha)
  check_sequence_inputs(chosen_logps=chosen_logps, rejected_logps=rejected_logps)
  dtype = compute_dtype(chosen_logps, rejected_logps, chosen_nll)
  c, r = _cast(dtype, chosen_logps, rejected_logps)
  preference = jnp.mean(-jax.nn.log_sigmoid(beta * (c - r)))
  nll = _mean_nll(chosen_nll, dtype, chosen_logps=c)
  loss = preference + alpha * nll
  metrics = {
      "nll": jax.lax.stop_gradient(nll),
      "preference_loss": jax.lax.stop_gradient(preference),
      **preference_metrics(beta * c, beta * r),
  }
  return loss, metrics
