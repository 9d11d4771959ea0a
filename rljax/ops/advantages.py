"""Critic-free advantage estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++, ReMax) and reward shaping.

Conventions shared by every function here:
- Groups are contiguous rows: completion j of prompt i is row i·group_size + j, and a group
  estimator needs `group_size >= 2` and `B % group_size == 0` (else `ValueError`).
- Inputs pass through `jax.lax.stop_gradient`: advantages and shaped rewards are constants for
  the policy, so `jax.grad` through them is exactly zero.
- Arithmetic runs in `promote_types(dtype, float32)` (bf16 is promoted, float64 stays float64).
- A group whose scores are all equal gets an advantage of exactly 0 (never NaN, never the
  rounding residue of `s − mean`).
- Token-level outputs are 0 at masked positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rljax.ops._checks import (
    check_group_size,
    check_ndim,
    check_nonnegative,
    check_same_shape,
    compute_dtype,
)
from rljax.ops.masking import masked_mean, masked_var, masked_whiten
from rljax.ops.returns import discounted_returns


def _constant(x, dtype) -> jax.Array:
  return jax.lax.stop_gradient(jnp.asarray(x).astype(dtype))


def _check_rows(name: str, x, batch: int, mask_name: str = "mask") -> None:
  """Raises `ValueError` unless `x` is `[B]` with B the batch of the `[B, T]` `mask_name`."""
  if jnp.shape(x) != (batch,):
    raise ValueError(
        f"`{name}` must have shape ({batch},) (one value per row of `{mask_name}`); "
        f"got {jnp.shape(x)}."
    )


def _grouped_scores(scores, group_size: int) -> jax.Array:
  """`[B]` scores as a stop-gradient `[B // group_size, group_size]` array in compute dtype."""
  check_ndim("scores", scores, 1)
  num_groups = check_group_size(jnp.shape(scores)[0], group_size, name="scores")
  return _constant(scores, compute_dtype(scores)).reshape(num_groups, group_size)


def _zero_if_constant(advantages, grouped) -> jax.Array:
  """Exactly 0 in groups whose scores are all equal (`s − mean` can leave a rounding residue)."""
  constant = jnp.max(grouped, axis=1, keepdims=True) == jnp.min(grouped, axis=1, keepdims=True)
  return jnp.where(constant, 0, advantages)


def grpo_advantages(scores, *, group_size: int, normalize_std: bool = True, eps: float = 1e-6):
  """GRPO outcome advantages: each score standardised within its group.

    A_i = (s_i − mean_g(s)) / (std_g(s) + eps)   normalize_std=True  (GRPO, Shao et al. 2024)
    A_i = s_i − mean_g(s)                        normalize_std=False (Dr. GRPO, Liu et al. 2025)
  with std_g the unbiased (Bessel-corrected, ddof=1) standard deviation over the group, as
  `torch.std` in verl's `compute_grpo_outcome_advantage` and TRL's `GRPOTrainer`. `eps` is added
  to the std, not the variance, as both do (verl's default 1e-6; TRL uses 1e-4).

  Args:
    scores: [B] sequence-level rewards, B = num_prompts · group_size, groups contiguous.
    group_size: completions per prompt (>= 2).
    normalize_std: divide by the group std (True, default) or only subtract the mean.
    eps: added to the std (default 1e-6, verl); must be >= 0.

  Returns:
    [B] advantages (sum to zero in each group), stop-gradient. A zero-variance group gives
    exactly 0. Broadcast to tokens with `jnp.where(mask, adv[:, None], 0)`.

  Example:
    >>> grpo_advantages(jnp.array([1., 0., 0., 0.]), group_size=2)  # ≈ [0.707, -0.707, 0, 0]
  """
  check_nonnegative("eps", eps)
  s = _grouped_scores(scores, group_size)
  adv = s - jnp.mean(s, axis=1, keepdims=True)
  if normalize_std:
    adv = adv / (jnp.std(s, axis=1, ddof=1, keepdims=True) + eps)
  return _zero_if_constant(adv, s).reshape(-1)


def rloo_advantages(scores, *, group_size: int):
  """REINFORCE leave-one-out advantages: each score minus the mean of the other G − 1 scores.

    A_i = s_i − 1/(G−1) Σ_{j≠i} s_j = G/(G−1) · (s_i − mean_g(s))

  (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"; TRL's `RLOOTrainer` and verl's
  `compute_rloo_outcome_advantage` compute the same quantity.)

  Args:
    scores: [B] sequence-level rewards, groups contiguous.
    group_size: completions per prompt G (>= 2).

  Returns:
    [B] advantages (sum to zero in each group), stop-gradient; exactly 0 for a constant group.

  Example:
    >>> rloo_advantages(jnp.array([1., 0., 0.]), group_size=3)  # [1.0, -0.5, -0.5]
  """
  s = _grouped_scores(scores, group_size)
  others_mean = (jnp.sum(s, axis=1, keepdims=True) - s) / (group_size - 1)
  adv = s - others_mean
  return _zero_if_constant(adv, s).reshape(-1)


def grpo_process_advantages(step_rewards, step_mask, mask, *, group_size: int, eps: float = 1e-6):
  """GRPO process supervision (Shao et al. 2024, §4.1.3): group-normalised step rewards, summed forward.

  Layout: a reasoning step's reward sits at the token index where that step ENDS;
  `step_mask` marks those step-end positions. With R the set of all step rewards of all
  completions of one group (n = |R|, mean and unbiased std over R):
    r̃ = (r − mean(R)) / (std(R) + eps)      at every step end
    A_t = Σ_{step ends t' ≥ t in the same row} r̃_{t'}   (suffix sum), 0 where `mask` is 0.
  Tokens after a row's last step end get 0. A group with one step, or whose step rewards are all
  equal, gives exactly 0; a group with no step gives 0.

  Args:
    step_rewards: [B, T] step rewards at step-end positions (other positions are ignored).
    step_mask: [B, T] bool or numeric; nonzero marks a step end. Step ends should lie on valid
      tokens of `mask`; all of them count in the normalisation either way.
    mask: [B, T] response mask; the advantage is 0 where it is 0.
    group_size: completions per prompt (>= 2), groups contiguous.
    eps: added to the std (default 1e-6, as `grpo_advantages`).

  Returns:
    [B, T] token advantages in `promote_types(step_rewards.dtype, float32)`, stop-gradient.

  Example:
    >>> # two steps ending at t=1 and t=3 in row 0
    >>> adv = grpo_process_advantages(r, jnp.array([[0, 1, 0, 1], ...]), mask, group_size=4)
  """
  check_ndim("step_rewards", step_rewards, 2)
  check_same_shape(step_rewards=step_rewards, step_mask=step_mask, mask=mask)
  check_nonnegative("eps", eps)
  batch, length = jnp.shape(step_rewards)
  num_groups = check_group_size(batch, group_size, name="step_rewards")
  dtype = compute_dtype(step_rewards)
  is_end = jnp.asarray(step_mask) != 0
  rewards = jnp.where(is_end, _constant(step_rewards, dtype), 0)
  grouped, ends = rewards.reshape(num_groups, -1), is_end.reshape(num_groups, -1)
  mean = masked_mean(grouped, ends, axis=1)[:, None]
  std = jnp.sqrt(masked_var(grouped, ends, unbiased=True, axis=1))[:, None]
  normalised = jnp.where(ends, (grouped - mean) / (std + eps), 0)
  constant = jnp.max(jnp.where(ends, grouped, -jnp.inf), axis=1, keepdims=True) == jnp.min(
      jnp.where(ends, grouped, jnp.inf), axis=1, keepdims=True
  )
  normalised = jnp.where(constant, 0, normalised).reshape(batch, length)
  suffix = jax.lax.cumsum(normalised, axis=1, reverse=True)
  return jnp.where(jnp.asarray(mask) != 0, suffix, 0)


def reinforce_pp_advantages(token_rewards, mask, *, gamma: float):
  """REINFORCE++ advantages (Hu 2025): discounted reward-to-go, whitened over the whole batch.

    G_t = r_t + γ·G_{next valid}          (`discounted_returns`, masked positions skipped)
    A = masked_whiten(G, mask)            (batch mean and unbiased variance over valid tokens,
                                           eps 1e-8)
  as verl's `compute_reinforce_plus_plus_outcome_advantage`. Where verl resets the running
  return at every masked position, here it is carried across (identical for trailing padding;
  interleaved non-policy tokens no longer cut the return).

  Args:
    token_rewards: [B, T] per-token rewards (e.g. `token_level_rewards(scores, mask, kl=kl,
      beta=beta)`, REINFORCE++'s token-level KL penalty).
    mask: [B, T] response mask.
    gamma: discount in [0, 1] (verl's default is 1.0).

  Returns:
    [B, T] advantages, 0 at masked positions, stop-gradient. All-equal returns give 0.

  Example:
    >>> rewards = token_level_rewards(scores, mask, kl=kl, beta=0.01)
    >>> adv = reinforce_pp_advantages(rewards, mask, gamma=1.0)
  """
  returns = discounted_returns(token_rewards, mask, gamma=gamma)
  return masked_whiten(returns, mask)


def reinforce_pp_baseline_advantages(scores, mask, *, group_size: int):
  """REINFORCE++-baseline (Hu 2025): group-mean baseline, broadcast to tokens, batch-whitened.

    a_i = s_i − mean_g(s);    A_{i,t} = masked_whiten(a_i · mask, mask)_{i,t}
  (verl's `compute_reinforce_plus_plus_baseline_outcome_advantage`; the whitening statistics
  are token-weighted over all valid tokens of the batch, eps 1e-8).

  Args:
    scores: [B] sequence-level rewards, groups contiguous.
    mask: [B, T] response mask.
    group_size: completions per prompt (>= 2).

  Returns:
    [B, T] advantages, 0 at masked positions, stop-gradient. A batch whose groups are all
    constant gives 0.

  Example:
    >>> adv = reinforce_pp_baseline_advantages(scores, mask, group_size=8)
  """
  check_ndim("mask", mask, 2)
  s = _grouped_scores(scores, group_size)
  _check_rows("scores", scores, jnp.shape(mask)[0])
  centred = _zero_if_constant(s - jnp.mean(s, axis=1, keepdims=True), s).reshape(-1)
  valid = jnp.asarray(mask) != 0
  return masked_whiten(jnp.where(valid, centred[:, None], 0), mask)


def remax_advantages(token_rewards, baseline_scores, mask):
  """ReMax advantages (Li et al. 2023): return-to-go minus the greedy completion's score.

    A_t = Σ_{valid k ≥ t} r_k − b       on valid tokens, 0 elsewhere
  with b the reward of the greedy (argmax-decoded) response to the same prompt; verl's
  `compute_remax_outcome_advantage` (γ = 1, no whitening).

  Args:
    token_rewards: [B, T] per-token rewards of the sampled responses.
    baseline_scores: [B] score of the greedy response for each row's prompt (stop-gradient).
    mask: [B, T] response mask.

  Returns:
    [B, T] advantages, 0 at masked positions, stop-gradient.

  Example:
    >>> adv = remax_advantages(token_level_rewards(scores, mask), greedy_scores, mask)
  """
  check_ndim("token_rewards", token_rewards, 2)
  check_same_shape(token_rewards=token_rewards, mask=mask)
  _check_rows("baseline_scores", baseline_scores, jnp.shape(mask)[0])
  dtype = compute_dtype(token_rewards, baseline_scores)
  returns = discounted_returns(jnp.asarray(token_rewards).astype(dtype), mask, gamma=1.0)
  baseline = _constant(baseline_scores, dtype)[:, None]
  return jnp.where(jnp.asarray(mask) != 0, returns - baseline, 0)


def token_level_rewards(scores, mask, *, kl=None, beta: float = 0.0):
  """RLHF reward shaping: the sequence score on the last response token, −β·KL on every token.

    r_t = s · [t = last valid token of the row] − β · kl_t · mask_t
  (Ziegler et al. 2019; Ouyang et al. 2022 (InstructGPT); verl's `apply_kl_penalty` and TRL's
  PPO trainer). A row with no valid token gets all zeros.

  Args:
    scores: [B] sequence-level rewards (e.g. reward-model or verifier scores).
    mask: [B, T] response mask.
    kl: optional [B, T] per-token KL estimates (e.g. `kl_penalty(old_logp, ref_logp,
      kind="k1")`); required when `beta != 0`.
    beta: KL coefficient (default 0.0: no penalty).

  Returns:
    [B, T] rewards in `promote_types(result_type(scores, kl), float32)`, 0 at masked positions.
    `scores` and `kl` are stop-gradient (the rewards are constants for the policy).

  Example:
    >>> token_level_rewards(jnp.array([2.]), jnp.array([[1, 1, 0]]))  # [[0., 2., 0.]]
  """
  check_ndim("mask", mask, 2)
  batch, length = jnp.shape(mask)
  _check_rows("scores", scores, batch)
  if kl is None and beta != 0:
    raise ValueError(f"`kl` is required when `beta` != 0 (got beta={beta!r}).")
  check_same_shape(mask=mask, kl=kl)
  dtype = compute_dtype(scores) if kl is None else compute_dtype(scores, kl)
  valid = jnp.asarray(mask) != 0
  positions = jnp.arange(length)
  last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
  rewards = jnp.where(valid & (positions == last), _constant(scores, dtype)[:, None], 0)
  if kl is not None:
    rewards = rewards - jnp.asarray(beta, dtype) * jnp.where(valid, _constant(kl, dtype), 0)
  return rewards
