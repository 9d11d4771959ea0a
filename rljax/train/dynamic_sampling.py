"""Dynamic sampling (DAPO, Yu et al. 2025): keep only groups whose advantage can be nonzero.

Groups whose rewards all agree carry no policy-gradient signal. `sample_informative` drops them
and resamples the prompts (up to `max_resample` extra rollouts) until the batch is refilled with
informative groups; if it cannot be refilled, zero-variance groups fill the rest (their
advantage is 0), so the batch shape never changes (no recompilation).

`stream_informative` is the rollout engine's version with the same selection: the resamples
are requests of the same engine run, held back until needed — as soon as a group is scored
uninformative, the next group of the resamples is released and enters free slots while the
batch is still decoding (no new batch, no drain in between, and only as many groups sampled as
the refill needs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from rljax.data.batching import PromptBatch
from rljax.rollout.engine import EngineRun
from rljax.rollout.generate import Rollout
from rljax.rollout.sampling import SamplingConfig
from rljax.train.scoring import Scored, rollout_metrics, score_rollout


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


def stream_informative(run, score: Callable[[Rollout, int], Scored], num_prompts: int,
                       num_samples: int, *, max_resample: int) -> tuple[Scored, dict[str, float]]:
  """`sample_informative`'s selection as a stream (module docstring) over `run`, an `EngineRun`
  of (1 + max_resample) · B prompts — copy k of the batch is prompts k·B … k·B + B − 1, held
  for k ≥ 1 — where `score(rollout, i)` scores a finished group of prompt i (a `Scored`, host
  arrays). Each uninformative group releases the next group of the resamples, copy by copy in
  prompt order, so the informative groups a copy contributes are its first ones in prompt
  order, as when the whole copy is sampled; the batch is the informative groups of copy 0,
  then those of copy 1, …, filled with copy 0's uninformative ones.

  Returns the scored batch and `sample_informative`'s metrics (`resamples`: the copies a group
  was released from).
  """
  b, g = num_prompts, num_samples
  start = time.perf_counter()
  finished = np.zeros(((1 + max_resample) * b,), np.int64)  # finished samples per prompt copy
  groups: dict[int, Scored] = {}
  good: list[list[int]] = [[] for _ in range(1 + max_resample)]  # informative copies per copy
  scored_zero = []
  released, outstanding = b, b  # prompt copies released so far; released but not yet scored
  while outstanding:
    if not run.decoding:
      raise RuntimeError("the engine run stopped before every released group was scored.")
    for r in run.advance():
      copy = r // g
      finished[copy] += 1
      if finished[copy] < g:
        continue
      outstanding -= 1
      groups[copy] = score(run.rollout(range(copy * g, (copy + 1) * g)), copy % b)
      if informative_groups(groups[copy], g)[0]:
        good[copy // b].append(copy)
        continue
      if copy < b:
        scored_zero.append(copy)
      if released < (1 + max_resample) * b:  # one more group in place of this one
        run.release(range(released * g, (released + 1) * g))
        released, outstanding = released + 1, outstanding + 1
  picks = [c for copy in good for c in sorted(copy)][:b]
  picks += sorted(scored_zero)[:b - len(picks)]
  batch = select_rows([groups[c] for c in picks], [(i, np.arange(g)) for i in range(len(picks))])
  batch = batch._replace(seconds=time.perf_counter() - start)
  opening = select_rows([groups[c] for c in range(b)], [(i, np.arange(g)) for i in range(b)])
  metrics = rollout_metrics(opening._replace(seconds=batch.seconds))
  metrics["zero_variance_groups"] = float(1.0 - informative_groups(opening, g).mean())
  metrics["resamples"] = float(-(-(released - b) // b))
  metrics["filled_zero_variance_groups"] = float(1.0 - informative_groups(batch, g).mean())
  return batch, metrics


def collect_streamed(graphdef: Any, params: Any, prompts: PromptBatch, key: jax.Array,
                     sampling: SamplingConfig, *, max_resample: int, stop_tokens: Sequence[int],
                     pad_id: int, engine: Any, mesh: Any = None, stop_strings: Any = None,
                     tokenizer: Any = None, **score_options: Any) -> tuple[Scored, dict]:
  """`collect_rollout` with dynamic sampling as a stream (`stream_informative`): one engine run
  over the prompts and `max_resample` held copies of them; `score_options` are
  `score_rollout`'s (reward fn, overlong penalty, ...)."""
  b, g = prompts.tokens.shape[0], sampling.num_samples
  copies = 1 + max_resample
  tiled = PromptBatch(np.tile(prompts.tokens, (copies, 1)), np.tile(prompts.mask, (copies, 1)),
                      list(prompts.texts) * copies,
                      {k: list(v) * copies for k, v in dict(prompts.fields).items()})
  run = EngineRun((graphdef, params), tiled.tokens, tiled.mask, key, sampling,
                  stop_tokens=stop_tokens, pad_id=pad_id, engine=engine, mesh=mesh,
                  stop_strings=stop_strings, tokenizer=tokenizer, held=range(b * g, copies * b * g))

  def score(rollout: Rollout, i: int) -> Scored:
    one = PromptBatch(prompts.tokens[i:i + 1], prompts.mask[i:i + 1], [prompts.texts[i]],
                      {k: [v[i]] for k, v in dict(prompts.fields).items()})
    scored = score_rollout(Rollout(*jax.device_get(tuple(rollout))), one, 0.0,
                           tokenizer=tokenizer, num_samples=g,
                           max_new_tokens=sampling.max_new_tokens, **score_options)
    return scored._replace(prompt_index=np.full((g,), i))

  return stream_informative(run, score, b, g, max_resample=max_resample)
