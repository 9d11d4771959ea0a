"""Reward-model losses: pairwise Bradley–Terry and listwise (all K-choose-2 pairs).

Rewards are the scalar outputs of a reward head, one per (prompt, response). Every computation
runs in `promote_types(dtype, float32)`; every loss returns `(loss, metrics)` with metrics that
carry no gradient.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from rljax.losses.dpo import Metrics, check_sequence_inputs, preference_metrics
from rljax.ops._checks import check_ndim, compute_dtype


def reward_model_loss(
    chosen_rewards, rejected_rewards, *, margin=None, center_coef: float | None = None
) -> tuple[jax.Array, Metrics]:
  """Pairwise Bradley–Terry reward-model loss, as in TRL's `RewardTrainer`.

    L = mean(−logσ(r_c − r_r − m)) + c·mean((r_c + r_r)²)

  m is an optional per-pair margin (Llama 2, Touvron et al. 2023: larger for pairs the annotators
  rated as clearly different; 0 when None). The second term, present when `center_coef` c is
  given, pulls the rewards towards zero mean (Eisenstein et al. 2023; TRL's
  `center_rewards_coefficient`, e.g. 0.01).

  Args:
    chosen_rewards: [B] reward of each chosen response.
    rejected_rewards: [B] reward of each rejected response.
    margin: None, a scalar, or a [B] array of per-pair margins (data: stop-gradient).
    center_coef: None (no centring term) or c ≥ 0.

  Returns:
    (loss, metrics) with "reward_accuracy" (fraction with r_c > r_r), "reward_margin"
    (mean r_c − r_r), "rewards_chosen", "rewards_rejected" (means).

  Example:
    >>> loss, m = reward_model_loss(reward_head(chosen), reward_head(rejected), center_coef=0.01)
  """
  check_sequence_inputs(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
  if center_coef is not None and not center_coef >= 0:
    raise ValueError(f"`center_coef` must be >= 0 or None; got {center_coef!r}.")
  dtype = compute_dtype(chosen_rewards, rejected_rewards)
  r_c = jnp.asarray(chosen_rewards).astype(dtype)
  r_r = jnp.asarray(rejected_rewards).astype(dtype)
  m = jnp.zeros((), dtype)
  if margin is not None:
    if jnp.ndim(margin) != 0:
      check_sequence_inputs(chosen_rewards=r_c, margin=margin)
    m = jax.lax.stop_gradient(jnp.asarray(margin)).astype(dtype)
  loss = jnp.mean(-jax.nn.log_sigmoid(r_c - r_r - m))
  if center_coef is not None:
    loss = loss + center_coef * jnp.mean(jnp.square(r_c + r_r))
  return loss, preference_metrics(r_c, r_r)


def _ranked_pairs(k: int) -> tuple[list[int], list[int]]:
  """Indices (i, j) of all pairs i < j of a list of k items ranked best first."""
  pairs = list(itertools.combinations(range(k), 2))
  return [i for i, _ in pairs], [j for _, j in pairs]


def listwise_reward_loss(rewards) -> tuple[jax.Array, Metrics]:
  """Listwise reward-model loss over ranked responses (InstructGPT, Ouyang et al. 2022, eq. 1).

  Each row holds the rewards of K responses to one prompt, ranked best first; every one of the
  K-choose-2 pairs (i < j) is a comparison where response i is preferred:

    L = mean_b [ 1/C(K,2) · Σ_{i<j} −logσ(r_{b,i} − r_{b,j}) ]

  Every prompt has the same number of pairs, so this is also the mean over all B·C(K,2) pairs.
  With K = 2 it equals `reward_model_loss(rewards[:, 0], rewards[:, 1])`.

  Args:
    rewards: [B, K] rewards, K ≥ 2, column 0 the best-ranked response.

  Returns:
    (loss, metrics) with "reward_accuracy" (fraction of pairs with r_i > r_j) and
    "reward_margin" (mean r_i − r_j over pairs).

  Raises:
    ValueError: `rewards` is not [B, K] or K < 2.

  Example:
    >>> loss, m = listwise_reward_loss(jnp.stack([r_best, r_mid, r_worst], axis=1))
  """
  check_ndim("rewards", rewards, 2)
  k = jnp.shape(rewards)[1]
  if k < 2:
    raise ValueError(
        f"`rewards` must have K >= 2 ranked responses per row; got shape {jnp.shape(rewards)}."
    )
  r = jnp.asarray(rewards).astype(compute_dtype(rewards))
  better, worse = _ranked_pairs(k)
  diff = r[:, better] - r[:, worse]  # [B, C(K,2)]
  loss = jnp.mean(-jax.nn.log_sigmoid(diff))
  d = jax.lax.stop_gradient(diff)
  metrics = {
      "reward_accuracy": jnp.mean((d > 0).astype(d.dtype)),
      "reward_margin": jnp.mean(d),
  }
  return loss, metrics
