"""DPO and its pairwise variants, on sequence-level log-probs.

Shared conventions (see docs/architecture.md):
  * Inputs are `[B]` sequence log-probs (sums over the response tokens, e.g. from
    `sequence_logprobs(token_logps, mask)`), one row per (prompt, chosen, rejected) triple.
  * The reference log-probs are wrapped in `stop_gradient`: only the policy log-probs carry
    gradient. Lengths are data (stop-gradient too).
  * Every computation runs in `promote_types(dtype, float32)` (bf16 is promoted, float64 stays).
  * The loss is the mean over the batch of a per-pair loss; `(loss, metrics)` is returned, ready
    for `jax.value_and_grad(..., has_aux=True)`. The metrics carry no gradient.

With s_c = π_c − r_c and s_r = π_r − r_r the chosen and rejected log-ratios (policy minus
reference) and δ = s_c − s_r, the implicit rewards are β·s_c and β·s_r (Rafailov et al. 2023).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rljax.ops._checks import (
    LOG_RATIO_CLAMP,
    check_arrays,
    check_choice,
    check_number,
    compute_dtype,
)

Metrics = dict[str, jax.Array]

DPO_VARIANTS = (
    "sigmoid",
    "robust",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)

# EXO (Ji et al. 2024) needs ε > 0 (its loss has log ε); the paper recommends 1e-3, which TRL used
# whenever `label_smoothing` was left at 0 (TRL ≥ 0.2x raises instead).
EXO_DEFAULT_LABEL_SMOOTHING = 1e-3


def preference_metrics(chosen_rewards, rejected_rewards) -> Metrics:
  """Batch means of the implicit rewards, their margin, and how often chosen beats rejected.

  Args:
    chosen_rewards: [B] reward of each chosen response (e.g. β·(π_c − r_c)).
    rejected_rewards: [B] reward of each rejected response.

  Returns:
    {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"}, scalars without
    gradient. `reward_accuracy` is the fraction of pairs with chosen > rejected (ties count as
    wrong, as in TRL), so it lies in [0, 1].
  """
  rc = jax.lax.stop_gradient(chosen_rewards)
  rr = jax.lax.stop_gradient(rejected_rewards)
  return {
      "rewards_chosen": jnp.mean(rc),
      "rewards_rejected": jnp.mean(rr),
      "reward_margin": jnp.mean(rc - rr),
      "reward_accuracy": jnp.mean((rc > rr).astype(rc.dtype)),
  }


def check_sequence_inputs(**arrays) -> None:
  """Each named array (None skipped) must be `[B]`, and all must have the same shape."""
  check_arrays(1, **arrays)


class _PairTerms(NamedTuple):
  """What a variant's per-pair loss may use (all [B] in the compute dtype)."""

  chosen: jax.Array  # s_c = π_c − r_c
  rejected: jax.Array  # s_r = π_r − r_r
  chosen_norm: jax.Array | None  # s_c / max(len_c, 1), when lengths are given
  rejected_norm: jax.Array | None  # s_r / max(len_r, 1)
  beta: float
  label_smoothing: float
  discopop_tau: float
  bco_delta: jax.Array


_log_sigmoid = jax.nn.log_sigmoid
_sigmoid = jax.nn.sigmoid


def _sigmoid_loss(t: _PairTerms) -> jax.Array:
  """cDPO (Mitchell 2023): −(1−ε)·logσ(βδ) − ε·logσ(−βδ); ε = 0 is DPO."""
  x = t.beta * (t.chosen - t.rejected)
  eps = t.label_smoothing
  return -(1.0 - eps) * _log_sigmoid(x) - eps * _log_sigmoid(-x)


def _robust_loss(t: _PairTerms) -> jax.Array:
  """rDPO (Chowdhury et al. 2024): (−(1−ε)·logσ(βδ) + ε·logσ(−βδ)) / (1 − 2ε)."""
  x = t.beta * (t.chosen - t.rejected)
  eps = t.label_smoothing
  return (-(1.0 - eps) * _log_sigmoid(x) + eps * _log_sigmoid(-x)) / (1.0 - 2.0 * eps)


def _hinge_loss(t: _PairTerms) -> jax.Array:
  """SLiC / RSO hinge (Zhao et al. 2023; Liu et al. 2024): relu(1 − βδ)."""
  return jax.nn.relu(1.0 - t.beta * (t.chosen - t.rejected))


def _ipo_loss(t: _PairTerms) -> jax.Array:
  """IPO (Azar et al. 2024, eq. 17): (δ − 1/(2β))², δ length-normalised when lengths are given."""
  if t.chosen_norm is not None:
    delta = t.chosen_norm - t.rejected_norm
  else:
    delta = t.chosen - t.rejected
  return jnp.square(delta - 1.0 / (2.0 * t.beta))


def _exo_pair_loss(t: _PairTerms) -> jax.Array:
  """EXO-pref (Ji et al. 2024, eq. 16): KL(softmax(β·[s_c, s_r]) ‖ [1−ε, ε]).

  = σ(βδ)·(logσ(βδ) − log(1−ε)) + σ(−βδ)·(logσ(−βδ) − log ε).
  """
  x = t.beta * (t.chosen - t.rejected)
  eps = t.label_smoothing if t.label_smoothing > 0 else EXO_DEFAULT_LABEL_SMOOTHING
  log_pw, log_pl = jnp.log1p(-eps), jnp.log(eps)
  return _sigmoid(x) * (_log_sigmoid(x) - log_pw) + _sigmoid(-x) * (_log_sigmoid(-x) - log_pl)


def _nca_pair_loss(t: _PairTerms) -> jax.Array:
  """NCA (Chen et al. 2024): −logσ(β·s_c) − ½·logσ(−β·s_c) − ½·logσ(−β·s_r)."""
  rc, rr = t.beta * t.chosen, t.beta * t.rejected
  return -_log_sigmoid(rc) - 0.5 * _log_sigmoid(-rc) - 0.5 * _log_sigmoid(-rr)


def _bco_pair_loss(t: _PairTerms) -> jax.Array:
  """BCO (Jung et al. 2024), paired: −logσ(β·s_c − Δ) − logσ(−(β·s_r − Δ))."""
  rc, rr = t.beta * t.chosen, t.beta * t.rejected
  return -_log_sigmoid(rc - t.bco_delta) - _log_sigmoid(-(rr - t.bco_delta))


def _sppo_hard_loss(t: _PairTerms) -> jax.Array:
  """SPPO, hard labels (Wu et al. 2024, eq. 4.7, P = 1/0): (s_c − 1/(2β))² + (s_r + 1/(2β))²."""
  half = 0.5 / t.beta
  return jnp.square(t.chosen - half) + jnp.square(t.rejected + half)


def _apo_zero_loss(t: _PairTerms) -> jax.Array:
  """APO-zero (D'Oosterlinck et al. 2024, eq. 7): (1 − σ(β·s_c)) + σ(β·s_r)."""
  return _sigmoid(-t.beta * t.chosen) + _sigmoid(t.beta * t.rejected)


def _apo_down_loss(t: _PairTerms) -> jax.Array:
  """APO-down (D'Oosterlinck et al. 2024, eq. 8): σ(β·s_c) + (1 − σ(βδ))."""
  return _sigmoid(t.beta * t.chosen) + _sigmoid(-t.beta * (t.chosen - t.rejected))


def _discopop_loss(t: _PairTerms) -> jax.Array:
  """DiscoPOP (Chris Lu et al. 2024, eq. 5), with x = βδ and m = σ(x/τ):

    (1 − m)·(−logσ(x)) + m·exp(−x)

  The second term is computed as exp(min(−x + logσ(x/τ), 20)): equal to m·exp(−x) (which is at
  most ~1 for τ < 1), and never inf·0 = NaN for x → −∞.
  """
  x = t.beta * (t.chosen - t.rejected)
  tau = t.discopop_tau
  logistic = -_log_sigmoid(x) * _sigmoid(-x / tau)
  exponential = jnp.exp(jnp.minimum(-x + _log_sigmoid(x / tau), LOG_RATIO_CLAMP))
  return logistic + exponential


def _sigmoid_norm_loss(t: _PairTerms) -> jax.Array:
  """Length-normalised DPO (TRL `sigmoid_norm`): −logσ(β·(s_c/len_c − s_r/len_r))."""
  return -_log_sigmoid(t.beta * (t.chosen_norm - t.rejected_norm))


_PER_PAIR_LOSS = {
    "sigmoid": _sigmoid_loss,
    "robust": _robust_loss,
    "hinge": _hinge_loss,
    "ipo": _ipo_loss,
    "exo_pair": _exo_pair_loss,
    "nca_pair": _nca_pair_loss,
    "bco_pair": _bco_pair_loss,
    "sppo_hard": _sppo_hard_loss,
    "apo_zero": _apo_zero_loss,
    "apo_down": _apo_down_loss,
    "discopop": _discopop_loss,
    "sigmoid_norm": _sigmoid_norm_loss,
}


def _check_label_smoothing(variant: str, label_smoothing: float) -> None:
  if variant == "robust":
    if not 0.0 <= label_smoothing < 0.5:
      raise ValueError(
          f"`label_smoothing` must lie in [0, 0.5) for variant 'robust'; got {label_smoothing!r}."
      )
  elif variant == "exo_pair":
    if not 0.0 <= label_smoothing < 1.0:
      raise ValueError(
          f"`label_smoothing` must lie in [0, 1) for variant 'exo_pair'; got {label_smoothing!r}."
      )
  elif not 0.0 <= label_smoothing <= 1.0:
    raise ValueError(f"`label_smoothing` must lie in [0, 1]; got {label_smoothing!r}.")


def check_dpo_options(*, beta: float, variant: str, label_smoothing: float,
                      discopop_tau: float) -> None:
  """ValueError naming the option unless `variant` is one of `DPO_VARIANTS`, β > 0, τ > 0 and
  ε lies in the variant's range (the checks of `dpo_loss` and of `DPOConfig`)."""
  check_choice("DPO `variant`", variant, DPO_VARIANTS)
  check_number("beta", beta, low_open=True)
  check_number("discopop_tau", discopop_tau, low_open=True)
  _check_label_smoothing(variant, label_smoothing)


def _normalised(log_ratio, lengths, dtype) -> jax.Array:
  """log_ratio / max(lengths, 1) (TRL clamps the token count at 1); lengths are stop-gradient."""
  n = jax.lax.stop_gradient(jnp.asarray(lengths)).astype(dtype)
  return log_ratio / jnp.maximum(n, 1.0)


def _length_terms(variant, log_ratios, chosen_lengths, rejected_lengths, dtype):
  """(s_c / len_c, s_r / len_r) when lengths are given, else (None, None); checks the pairing."""
  if (chosen_lengths is None) != (rejected_lengths is None):
    missing = "chosen_lengths" if chosen_lengths is None else "rejected_lengths"
    raise ValueError(f"`{missing}` is missing: pass both `chosen_lengths` and `rejected_lengths`.")
  if chosen_lengths is None:
    if variant == "sigmoid_norm":
      raise ValueError(
          "Variant 'sigmoid_norm' divides each log-ratio by its length: pass `chosen_lengths` and "
          "`rejected_lengths` ([B] response token counts)."
      )
    return None, None
  s_c, s_r = log_ratios
  check_sequence_inputs(policy_chosen=s_c, chosen_lengths=chosen_lengths)
  check_sequence_inputs(policy_chosen=s_c, rejected_lengths=rejected_lengths)
  return _normalised(s_c, chosen_lengths, dtype), _normalised(s_r, rejected_lengths, dtype)


def dpo_loss(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    *,
    beta: float = 0.1,
    variant: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    discopop_tau: float = 0.05,
    bco_delta=0.0,
) -> tuple[jax.Array, Metrics]:
  """Direct Preference Optimization loss and its pairwise variants (Rafailov et al. 2023).

  With s_c = π_c − r_c, s_r = π_r − r_r (policy minus reference sequence log-probs),
  δ = s_c − s_r, x = β·δ, ε = `label_smoothing`, and s̄ = s / max(length, 1), the per-pair losses
  are (formulas as in TRL 1.16 `DPOTrainer`, except `sigmoid`'s label smoothing):

    sigmoid       −(1−ε)·logσ(x) − ε·logσ(−x)               DPO; conservative DPO (cDPO) for ε > 0
    robust        (−(1−ε)·logσ(x) + ε·logσ(−x)) / (1 − 2ε)   Chowdhury et al. 2024; 0 ≤ ε < 0.5
    hinge         relu(1 − x)                                SLiC / RSO
    ipo           (δ' − 1/(2β))², δ' = s̄_c − s̄_r with lengths, else δ (IPO, Azar et al. eq. 17)
    exo_pair      σ(x)(logσ(x) − log(1−ε)) + σ(−x)(logσ(−x) − log ε)  EXO eq. 16; ε = 0 → 1e-3
    nca_pair      −logσ(β s_c) − ½·logσ(−β s_c) − ½·logσ(−β s_r)      NCA (Chen et al. 2024)
    bco_pair      −logσ(β s_c − Δ) − logσ(−(β s_r − Δ))                BCO (Jung et al. 2024)
    sppo_hard     (s_c − 1/(2β))² + (s_r + 1/(2β))²                    SPPO, hard labels
    apo_zero      (1 − σ(β s_c)) + σ(β s_r)                            APO eq. 7
    apo_down      σ(β s_c) + (1 − σ(x))                                APO eq. 8
    discopop      (1 − σ(x/τ))·(−logσ(x)) + σ(x/τ)·exp(−x)             DiscoPOP eq. 5, τ = 0.05
    sigmoid_norm  −logσ(β·(s̄_c − s̄_r))                                 TRL length-normalised DPO

  Conventions where implementations differ:
    * `sigmoid` with ε > 0 is cDPO (Mitchell 2023; TRL < 1.0); TRL 1.x dropped label smoothing
      from `sigmoid`. With ε ↦ 1 − ε and chosen ↔ rejected swapped the loss is unchanged.
    * `exo_pair` needs ε > 0; ε = 0 (the default) means the EXO paper's 1e-3, as older TRL did
      (TRL 1.x raises instead).
    * `bco_pair`: TRL 1.x uses Δ = 0; TRL ≤ 0.1x and the BCO paper shift the rewards by a
      running mean Δ of the batch-mean reward. A pure function keeps no running state, so Δ is
      the `bco_delta` argument (default 0.0, TRL 1.x); pass your own running mean (e.g. of
      `(metrics["rewards_chosen"] + metrics["rewards_rejected"]) / 2`) to get the paper's form.
    * Lengths (TRL clamps them at 1) are used by `ipo` (optional) and `sigmoid_norm` (required)
      and ignored by the other variants.

  Args:
    policy_chosen: [B] policy log-prob (sum over tokens) of each chosen response.
    policy_rejected: [B] policy log-prob of each rejected response.
    ref_chosen: [B] reference log-prob of each chosen response (stop-gradient).
    ref_rejected: [B] reference log-prob of each rejected response (stop-gradient).
    beta: β > 0, the KL-regularisation strength (0.1, TRL's default; IPO's τ for `ipo`).
    variant: one of "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair",
      "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm".
    label_smoothing: ε, the assumed label-flip probability, used by `sigmoid`, `robust` and
      `exo_pair` (in [0, 1]; [0, 0.5) for `robust`; [0, 1) for `exo_pair`).
    chosen_lengths: optional [B] response token counts of the chosen responses.
    rejected_lengths: optional [B] response token counts of the rejected responses.
    discopop_tau: τ > 0 of `discopop` (0.05, the DiscoPOP paper and TRL).
    bco_delta: Δ of `bco_pair`, a Python float or scalar array (stop-gradient); default 0.0.

  Returns:
    (loss, metrics): the batch mean of the per-pair loss, in `promote_types(dtype, float32)`,
    and {"rewards_chosen": mean β·s_c, "rewards_rejected": mean β·s_r, "reward_margin":
    mean β·δ, "reward_accuracy": fraction with β·s_c > β·s_r} (no gradient). Log-probs of ±1e4
    give finite losses and gradients for every variant.

  Raises:
    ValueError: unknown `variant` (the message lists the valid ones), shape mismatch, β ≤ 0,
      ε out of range, `sigmoid_norm` without `chosen_lengths`/`rejected_lengths`.

  Example:
    >>> loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)            # DPO
    >>> loss, _ = dpo_loss(pc, pr, rc, rr, variant="ipo", chosen_lengths=nc, rejected_lengths=nr)
    >>> grads = jax.grad(lambda p: dpo_loss(*logps(p), rc, rr)[0])(params)
  """
  check_dpo_options(beta=beta, variant=variant, label_smoothing=label_smoothing,
                    discopop_tau=discopop_tau)
  check_sequence_inputs(
      policy_chosen=policy_chosen,
      policy_rejected=policy_rejected,
      ref_chosen=ref_chosen,
      ref_rejected=ref_rejected,
  )
  if jnp.ndim(bco_delta) != 0:
    raise ValueError(f"`bco_delta` must be a scalar; got shape {jnp.shape(bco_delta)}.")
  dtype = compute_dtype(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
  s_c = jnp.asarray(policy_chosen).astype(dtype) - jax.lax.stop_gradient(ref_chosen).astype(dtype)
  s_r = jnp.asarray(policy_rejected).astype(dtype) - jax.lax.stop_gradient(ref_rejected).astype(
      dtype
  )
  chosen_norm, rejected_norm = _length_terms(
      variant, (s_c, s_r), chosen_lengths, rejected_lengths, dtype
  )
  terms = _PairTerms(
      chosen=s_c,
      rejected=s_r,
      chosen_norm=chosen_norm,
      rejected_norm=rejected_norm,
      beta=beta,
      label_smoothing=label_smoothing,
      discopop_tau=discopop_tau,
      bco_delta=jax.lax.stop_gradient(jnp.asarray(bco_delta, dtype)),
  )
  loss = jnp.mean(_PER_PAIR_LOSS[variant](terms))
  return loss, preference_metrics(beta * s_c, beta * s_r)
