"""Rollout → rewards on the host: sampling, reward calling and validation, rollout metrics.

  collect_rollout(...)   `rljax.rollout.generate` with a `SamplingConfig`, then the reward
                         function on the decoded completions (`Scored`, numpy arrays)
  call_reward_fn(...)    the reward call with its keywords, and its result checked: one finite
                         score per completion, or `StepRewards` (process supervision); a
                         non-finite reward raises, naming the rows, or under
                         `nonfinite_rewards="drop"` its rows are dropped (`drop_rows`)
  overlong_penalty(...)  DAPO's soft overlong punishment

Token hygiene: completions are decoded with the tokenizer only to call the reward function and to
match stop strings; the training batch holds the sampled ids themselves (never decoded and
re-encoded). Completion masks come from the rollout's lengths (pad may equal EOS) and include the
stop token.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from rljax.agents.rollout import multi_turn_rollout
from rljax.ops.overlong import soft_overlong_penalty
from rljax.rollout.engine import EngineConfig, engine_generate
from rljax.rollout.generate import Rollout, generate
from rljax.rollout.sampling import SamplingConfig
from rljax.rollout.stops import check_stop_strings, cut_at_stop_strings

Array = jax.Array
NONFINITE_REWARDS = ("raise", "drop")  # what a non-finite outcome reward does


class Scored(NamedTuple):
  """A rollout on the host (numpy arrays) with its rewards.

  Outcome rewards give one score per row. Process rewards (a reward function returning
  `rljax.rewards.StepRewards`) give one reward per step, at the completion token where the step
  ends; a row's score is then the SUM of its step rewards (used for metrics, accuracy and
  `reward_mean`).

  Attributes:
    rollout: `Rollout` of numpy arrays, B = num_prompts · num_samples rows.
    scores: [B] float32 rewards (overlong penalty included).
    raw_scores: [B] float32 rewards of the reward function alone.
    prompt_index: [B] int, the prompt each row answers.
    completions: list of B decoded completion texts.
    seconds: wall time of the rollout (sampling only).
    step_rewards: [B, N] float32 step rewards at step ends, 0 elsewhere (overlong penalty
      included, see `collect_rollout`); None for outcome rewards.
    step_mask: [B, N] bool, True at step ends; None for outcome rewards.
    dropped: [B] bool, the rows dropped for a non-finite reward (`drop_rows`); None: none.
    policy_mask: [B, N] bool, the completion tokens the policy sampled (a multi-turn
      trajectory's observations excluded: `collect_trajectories`); None: all.
    metrics: host metrics of the sampler beyond `rollout_metrics`' (multi-turn: turns,
      truncations, the environment's counts); None: none.
  """

  rollout: Rollout
  scores: np.ndarray
  raw_scores: np.ndarray
  prompt_index: np.ndarray
  completions: list
  seconds: float
  step_rewards: np.ndarray | None = None
  step_mask: np.ndarray | None = None
  dropped: np.ndarray | None = None
  policy_mask: np.ndarray | None = None
  metrics: dict | None = None


def repeat_rows(values: Sequence[Any], n: int) -> list:
  """[a, b] → [a, a, b, b] for n = 2 (samples of one prompt are contiguous rows)."""
  return [v for v in values for _ in range(n)]


def decode_completions(tokenizer: Any, rollout: Rollout) -> list:
  """Completion texts (special tokens skipped) for the reward function; token-id lists when
  `tokenizer` is None."""
  p = rollout.prompt_mask.shape[1]
  ids = [row[p : p + int(n)].tolist() for row, n in zip(rollout.tokens, rollout.lengths)]
  if tokenizer is None:
    return ids
  return tokenizer.batch_decode(ids, skip_special_tokens=True)


def _accepted_kwargs(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
  """The keyword arguments `fn` accepts (all of them when it takes **kwargs)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return kwargs
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    return kwargs
  names = {p.name for p in params}
  return {k: v for k, v in kwargs.items() if k in names}


def is_step_rewards(value: Any) -> bool:
  """True for a process reward (anything with `rewards` and `step_mask` attributes, such as
  `rljax.rewards.StepRewards`); the trainers do not import `rljax.rewards`."""
  return hasattr(value, "rewards") and hasattr(value, "step_mask")


def _outcome_scores(value: Any, batch: int, nonfinite_rewards: str = "raise") -> np.ndarray:
  if is_step_rewards(value):
    raise ValueError(
      "`reward_fn` returned per-step rewards (StepRewards) where one reward per completion is "
      "expected; train on step rewards with GRPOConfig(advantage=\"process\")."
    )
  scores = np.asarray(value, np.float32).reshape(-1)
  if scores.shape != (batch,):
    raise ValueError(f"`reward_fn` returned {scores.shape[0]} rewards for {batch} completions.")
  bad = np.flatnonzero(~np.isfinite(scores))
  if bad.size and nonfinite_rewards == "raise":
    raise ValueError(f"`reward_fn` returned non-finite rewards for rows {bad.tolist()[:8]} "
                     f"(e.g. {scores[bad[0]]}); fix the reward function, or drop such rows "
                     "with the config's nonfinite_rewards=\"drop\".")
  return scores


def _step_reward_arrays(value: Any, rollout: Rollout) -> tuple[np.ndarray, np.ndarray]:
  """(rewards float32 [B, N], step_mask bool [B, N]) of a process reward, checked: shapes, step
  ends on completion tokens, finite rewards at step ends; rewards off the step ends are zeroed."""
  if not is_step_rewards(value):
    raise ValueError(
      "process supervision needs a `reward_fn` that returns StepRewards (`rewards` and "
      "`step_mask`, [B, N]; see `rljax.rewards.process_reward`); got "
      f"{type(value).__name__} {np.shape(value)}."
    )
  want = rollout.completion_mask.shape
  rewards = np.asarray(value.rewards, np.float32)
  step_mask = np.asarray(value.step_mask) != 0
  for name, x in (("rewards", rewards), ("step_mask", step_mask)):
    if x.shape != want:
      raise ValueError(f"the `reward_fn`'s StepRewards.{name} has shape {x.shape}; expected "
                       f"{want} (rows × max_new_tokens).")
  outside = np.flatnonzero((step_mask & ~np.asarray(rollout.completion_mask, bool)).any(axis=1))
  if outside.size:
    raise ValueError(f"StepRewards.step_mask marks step ends outside the completion in rows "
                     f"{outside.tolist()}; steps must end on completion tokens.")
  bad = np.flatnonzero((step_mask & ~np.isfinite(rewards)).any(axis=1))
  if bad.size:
    raise ValueError(f"StepRewards.rewards are not finite at step ends in rows {bad.tolist()}.")
  return np.where(step_mask, rewards, 0.0).astype(np.float32), step_mask


def step_reward_totals(step_rewards: np.ndarray, step_mask: np.ndarray) -> np.ndarray:
  """[B] float32 score of process rewards: Σ of each row's step rewards (summed in float64)."""
  return np.where(step_mask, step_rewards, 0.0).sum(axis=1, dtype=np.float64).astype(np.float32)


def call_reward_fn(
  reward_fn: Callable, prompts: list, completions: list, fields: dict[str, list],
  rollout: Rollout, *, process: bool | None = False, nonfinite_rewards: str = "raise",
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """reward_fn(prompts, completions, **fields, prompt_tokens=, prompt_mask=, completion_tokens=,
  completion_mask=, completion_lengths=); extra keywords a function does not declare (and it
  has no **kwargs) are not passed.

  Returns float32 [B] scores (outcome rewards) or, for process rewards (a reward fn returning
  `StepRewards`), the checked (step_rewards float32 [B, N], step_mask bool [B, N]).
  `process`: False requires outcome rewards, True process rewards, None takes either (a
  ValueError names the mismatch). A non-finite outcome reward raises a ValueError naming its
  rows unless `nonfinite_rewards` is "drop" (then it is returned as is, for `drop_rows`).
  """
  p = rollout.prompt_mask.shape[1]
  extra = {
    "prompt_tokens": rollout.tokens[:, :p],
    "prompt_mask": rollout.prompt_mask,
    "completion_tokens": rollout.tokens[:, p:],
    "completion_mask": rollout.completion_mask,
    "completion_lengths": rollout.lengths,
  }
  kwargs = _accepted_kwargs(reward_fn, {**fields, **extra})
  out = reward_fn(prompts, completions, **kwargs)
  if process is None:
    process = is_step_rewards(out)
  if process:
    return _step_reward_arrays(out, rollout)
  return _outcome_scores(out, len(completions), nonfinite_rewards)


def collect_rollout(
  graphdef: nnx.GraphDef,
  params: Any,
  prompts: Any,
  key: Array,
  sampling: SamplingConfig,
  *,
  reward_fn: Callable,
  tokenizer: Any,
  stop_tokens: Sequence[int],
  pad_id: int,
  overlong_cache: int | None = None,
  overlong_factor: float = 1.0,
  process: bool | None = None,
  nonfinite_rewards: str = "raise",
  drop_groups: bool = False,
  engine: EngineConfig | None = None,
  mesh: Any = None,
  stop_strings: Sequence[str] | None = None,
) -> Scored:
  """Samples `sampling.num_samples` completions per prompt with `params` (from
  `OnPolicyTrainer.sampler_params`) and scores them on the host with `reward_fn` (see
  `call_reward_fn`; `process` as there, default: whichever kind the reward fn returns).
  `engine` (an `EngineConfig`) samples with the continuous-batching engine
  (`engine_generate`, one pool per data shard of `mesh`), None with the static `generate`;
  both give the same rollout. `stop_strings` end a completion at the first token whose text
  (decoded by `tokenizer`) holds one (`rljax.rollout.stops`): the engine frees the slot then,
  `generate`'s rollout is cut after sampling.

  The overlong penalty (`overlong_cache`, DAPO's L_cache; `soft_overlong_penalty`) is added to
  the score of each row; for process rewards it is added to the reward at the row's last
  completion token, which becomes a step end (rows whose penalty is 0 are left unchanged), so
  the score stays the sum of step rewards.

  `nonfinite_rewards="drop"` drops the rows whose outcome reward is not finite (`drop_rows`;
  with `drop_groups`, every row of their prompt's group); process rewards always raise.
  """
  n = sampling.num_samples
  strings = check_stop_strings(stop_strings, tokenizer)
  start = time.perf_counter()
  if engine is None:
    out = cut_at_stop_strings(generate((graphdef, params), prompts.tokens, prompts.mask, key,
                                       sampling, stop_tokens=stop_tokens, pad_id=pad_id),
                              tokenizer, strings, pad_id=pad_id)
  else:
    out = engine_generate((graphdef, params), prompts.tokens, prompts.mask, key, sampling,
                          stop_tokens=stop_tokens, pad_id=pad_id, engine=engine, mesh=mesh,
                          stop_strings=strings, tokenizer=tokenizer)
  rollout = Rollout(*jax.device_get(tuple(out)))
  return score_rollout(rollout, prompts, time.perf_counter() - start, reward_fn=reward_fn,
                       tokenizer=tokenizer, num_samples=n, max_new_tokens=sampling.max_new_tokens,
                       overlong_cache=overlong_cache, overlong_factor=overlong_factor,
                       process=process, nonfinite_rewards=nonfinite_rewards,
                       drop_groups=drop_groups)


def score_rollout(rollout: Rollout, prompts: Any, seconds: float, *, reward_fn: Callable,
                  tokenizer: Any, num_samples: int, max_new_tokens: int,
                  overlong_cache: int | None = None, overlong_factor: float = 1.0,
                  process: bool | None = None, nonfinite_rewards: str = "raise",
                  drop_groups: bool = False) -> Scored:
  """The `Scored` of a host `rollout` of `prompts` (`num_samples` rows per prompt, in order):
  `collect_rollout`'s scoring (reward fn, overlong penalty, non-finite rows), `seconds` its
  sampling time."""
  n = num_samples
  completions = decode_completions(tokenizer, rollout)
  texts = repeat_rows(list(prompts.texts), n)
  fields = {k: repeat_rows(list(v), n) for k, v in dict(prompts.fields).items()}
  raw = call_reward_fn(reward_fn, texts, completions, fields, rollout, process=process,
                       nonfinite_rewards=nonfinite_rewards)
  step_rewards = step_mask = None
  if isinstance(raw, tuple):
    step_rewards, step_mask = raw
    raw = step_reward_totals(step_rewards, step_mask)
  scores = raw
  if overlong_cache is not None:
    penalty = soft_overlong_penalty(rollout.lengths, max_length=max_new_tokens,
                                    cache=overlong_cache, factor=overlong_factor)
    scores = raw + penalty
    if step_rewards is not None:
      step_rewards, step_mask = add_at_last_token(step_rewards, step_mask, rollout.lengths,
                                                  penalty)
      scores = step_reward_totals(step_rewards, step_mask)
  index = np.repeat(np.arange(rollout.tokens.shape[0] // n), n)
  scored = Scored(rollout, scores.astype(np.float32), raw, index, completions, seconds,
                  step_rewards, step_mask)
  if step_rewards is None and nonfinite_rewards == "drop":
    scored = drop_rows(scored, ~np.isfinite(raw), group_size=n if drop_groups else 1)
  return scored


def drop_rows(scored: Scored, rows: np.ndarray, *, group_size: int = 1) -> Scored:
  """`scored` with `rows` ([B] bool; with `group_size` > 1, every row of a group holding one)
  dropped without changing its shape: their completion mask (hence loss and attention masks)
  is cleared and their scores are 0, so they add nothing to a loss, an advantage or a masked
  statistic, and a dropped group has zero variance (advantage 0; dynamic sampling resamples
  it). `Scored.dropped` records them for the metrics."""
  rows = np.asarray(rows, bool)
  if group_size > 1:
    rows = np.repeat(rows.reshape(-1, group_size).any(axis=1), group_size)
  if not rows.any():
    return scored._replace(dropped=rows)
  r = scored.rollout
  rollout = r._replace(completion_mask=np.asarray(r.completion_mask) & ~rows[:, None])
  zero = lambda x: np.where(rows, 0.0, x).astype(np.float32)  # noqa: E731
  return scored._replace(rollout=rollout, scores=zero(scored.scores),
                         raw_scores=zero(scored.raw_scores), dropped=rows)


def add_at_last_token(step_rewards: np.ndarray, step_mask: np.ndarray, lengths: np.ndarray,
                      values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Adds values[b] to the step reward at row b's last completion token (index lengths[b] − 1),
  marking it a step end; rows with values[b] == 0 or an empty completion are unchanged."""
  rewards, mask = step_rewards.copy(), step_mask.copy()
  rows = np.flatnonzero((np.asarray(values) != 0) & (np.asarray(lengths) > 0))
  last = np.asarray(lengths)[rows] - 1
  rewards[rows, last] += np.asarray(values, np.float32)[rows]
  mask[rows, last] = True
  return rewards, mask


def rollout_metrics(scored: Scored) -> dict[str, float]:
  """Host metrics of one rollout: reward mean/std (over the rows kept: `Scored.dropped`),
  response length, truncation rate, tok/s, and `dropped_rows` when rows were dropped."""
  r = scored.rollout
  lengths = np.asarray(r.lengths, np.float64)
  kept = slice(None) if scored.dropped is None else ~scored.dropped
  scores, raw = np.asarray(scored.scores)[kept], np.asarray(scored.raw_scores)[kept]
  metrics = {
    "reward_mean": float(np.mean(scores)) if scores.size else 0.0,
    "reward_std": float(np.std(scores)) if scores.size else 0.0,
    "raw_reward_mean": float(np.mean(raw)) if raw.size else 0.0,
    "response_length": float(lengths.mean()),
    "truncation_rate": float(1.0 - np.mean(r.finished)),
    "tokens_per_second": float(lengths.sum() / max(scored.seconds, 1e-9)),
  }
  if scored.dropped is not None:
    metrics["dropped_rows"] = float(np.sum(scored.dropped))
  metrics.update(scored.metrics or {})
  return metrics


def accuracy_metrics(scored: Any, k: int) -> dict[str, float]:
  """{"accuracy", "reward_mean", "pass@k"} of k completions per prompt (a row is correct when its
  raw reward is > 0.5, the convention of 0/1 verifiers)."""
  correct = (scored.raw_scores > 0.5).reshape(-1, k)
  return {
    "accuracy": float(correct.mean()),
    "reward_mean": float(scored.raw_scores.mean()),
    f"pass@{k}": float(correct.any(axis=1).mean()),
  }


def collect_trajectories(graphdef: Any, params: Any, examples: Sequence[Any], key: Array,
                         sampling: SamplingConfig, *, env: Any, chat: Any,
                         process: bool = False, **options: Any) -> Scored:
  """`multi_turn_rollout` of the policy (graphdef, params) as a trainer's `Scored` (host
  arrays): scores the rows' rewards, `policy_mask` the sampled tokens, with `process` the turn
  rewards as step rewards at the turns' last tokens (GRPO's process advantages), and as
  metrics turns per row, the truncated fraction and the environment's counts per row.
  `options` are `multi_turn_rollout`'s."""
  start = time.perf_counter()
  trajectories, metrics = multi_turn_rollout((graphdef, params), env, examples, key, sampling,
                                             chat=chat, **options)
  t = jax.device_get(trajectories)
  seconds = time.perf_counter() - start
  rollout = Rollout(*t.rollout)
  p = rollout.prompt_mask.shape[1]
  completions = [chat.tokenizer.decode(row[p:p + int(n)].tolist(), skip_special_tokens=True)
                 for row, n in zip(rollout.tokens, rollout.lengths)]
  rows = len(completions)
  steps = {}
  if process:
    steps = dict(step_rewards=np.asarray(t.turn_rewards), step_mask=np.asarray(t.turn_mask))
  metrics = {f"env/{k}": v / rows for k, v in metrics.items()}
  metrics.update(turns_mean=float(np.mean(t.num_turns)),
                 truncated_rate=float(np.mean(t.truncated)))
  return Scored(rollout, np.asarray(t.rewards), np.asarray(t.rewards),
                np.repeat(np.arange(rows // sampling.num_samples), sampling.num_samples),
                completions, seconds, policy_mask=np.asarray(t.policy_mask), metrics=metrics,
                **steps)
