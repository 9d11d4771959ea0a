"""Dynamic sampling (DAPO, Yu et al. 2025): keep only groups whose advantage can be nonzero.

Groups whose rewards all agree carry no policy-gradient signal. `sample_informative` drops them
and resamples the prompts (up to `max_resample` extra rollouts) until the batch is refilled with
informative groups; if it cannot be refilled, zero-variance groups fill the rest (their
advantage is 0), so the batch shape never changes (no recompilation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from rljax.rollout.generate import Rollout
from rljax.train.scoring import Scored, rollout_metrics


def sample_informative(rollout: Callable[[jax.Array], Scored], key: jax.Array, num_samples: int,
                       *, enabled: bool, max_resample: int) -> tuple[Scored, dict[str, float]]:
  """`rollout(key)` (G = num_samples rows per prompt), refilled with informative groups.

  Returns the scored batch and host metrics: those of the first rollout (`rollout_metrics`),
  `zero_variance_groups` (its fraction of uninformative groups), `resamples` and, when
  enabled, `filled_zero_variance_groups` (the fraction left in the returned batch).
  """
  g = num_samples
  first = rollout(key)
  metrics = rollout_metrics(first)
  informative = informative_groups(first, g)
  metrics["zero_variance_groups"] = float(1.0 - informative.mean())
  resamples = 0
  if enabled:
    num_groups = informative.shape[0]
    pool, picks = [first], [(0, np.flatnonzero(informative))]
    have = len(picks[0][1])
    while have < num_groups and resamples < max_resample:
      resamples += 1
      extra = rollout(jax.random.fold_in(key, resamples))
      pool.append(extra)
      good = np.flatnonzero(informative_groups(extra, g))[: num_groups - have]
      picks.append((len(pool) - 1, good))
      have += len(good)
    if have < num_groups:  # fill with zero-variance groups (advantage 0) to keep the shape
      picks.append((0, np.flatnonzero(~informative)[: num_groups - have]))
    rows = [(i, (groups[:, None] * g + np.arange(g)).reshape(-1)) for i, groups in picks]
    first = select_rows(pool, [(i, r) for i, r in rows if len(r)])
    metrics["filled_zero_variance_groups"] = float(1.0 - informative_groups(first, g).mean())
  metrics["resamples"] = float(resamples)
  return first, metrics


def select_rows(scored: Sequence[Scored], picks: Sequence[tuple[int, np.ndarray]]) -> Scored:
  """Concatenates rows `rows` of `scored[i]` for each (i, rows) in `picks` (host arrays)."""

  def take(get):
    return np.concatenate([get(scored[i])[rows] for i, rows in picks], axis=0)

  rollout = Rollout(*(take(lambda s, j=j: s.rollout[j]) for j in range(len(Rollout._fields))))
  completions = [scored[i].completions[r] for i, rows in picks for r in rows]
  process = [scored[i].step_rewards is not None for i, _ in picks]
  if any(process) and not all(process):
    raise ValueError("`scored` mixes outcome and process (step) rewards.")
  steps = (take(lambda s: s.step_rewards), take(lambda s: s.step_mask)) if all(process) else ()
  dropped = policy = None
  if any(s.dropped is not None for s in scored):
    dropped = take(lambda s: np.zeros(len(s.scores), bool) if s.dropped is None else s.dropped)
  if any(s.policy_mask is not None for s in scored):
    policy = take(lambda s: np.ones(s.rollout.completion_mask.shape, bool)
                  if s.policy_mask is None else s.policy_mask)
  return Scored(
    rollout, take(lambda s: s.scores), take(lambda s: s.raw_scores),
    take(lambda s: s.prompt_index), completions, sum(s.seconds for s in scored), *steps,
  )._replace(dropped=dropped, policy_mask=policy, metrics=scored[0].metrics)


def informative_groups(scored: Scored, group_size: int) -> np.ndarray:
  """[num_groups] bool: True where the group's advantage can be nonzero (dynamic sampling).

  Outcome rewards: the group's scores are not all equal (`group_has_variance`). Process
  rewards: the group's step rewards (over all its step ends) are not all equal — the condition
  of `grpo_process_advantages` for a nonzero advantage. (The row sums would be wrong here: rows
  with different numbers of equal step rewards have different sums but zero advantage.)
  """
  if scored.step_rewards is None:
    return group_has_variance(scored.scores, group_size)
  rewards = np.asarray(scored.step_rewards).reshape(-1, group_size * scored.step_rewards.shape[1])
  ends = np.asarray(scored.step_mask, bool).reshape(rewards.shape)
  return np.where(ends, rewards, -np.inf).max(axis=1) > np.where(ends, rewards, np.inf).min(axis=1)


def group_has_variance(scores: np.ndarray, group_size: int) -> np.ndarray:
  """[num_groups] bool: True where the group's rewards are not all equal."""
  grouped = np.asarray(scores).reshape(-1, group_size)
  return grouped.max(axis=1) != grouped.min(axis=1)
