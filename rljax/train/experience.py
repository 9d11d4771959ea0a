"""Experience for on-policy RL: rollout → rewards → a static-shape batch, and jitted forward passes.

Shared by the GRPO and PPO trainers (`rljax.train.grpo`, `rljax.train.ppo`):

  collect_rollout(...)                 `rljax.rollout.generate` + host-side rewards (`Scored`)
  policy_logprobs(...)                 jitted [B, N] completion log-probs (+ entropy) of a policy
  critic_values(...)                   jitted [B, N] values of a `ValueModel` critic
  Experience                           the training batch (a pytree of [B, ...] arrays)

Alignment. A rollout row is `tokens = [prompt (P, left-padded) | completion (N)]`. Completion
token t (column P + t) is predicted from position P + t − 1, so the log-probs use the final
hidden states of positions P−1 .. P+N−2 and the values of the same positions (the value of the
state *before* token t; `ValueModel` gives the value after reading tokens[:, :s+1]).

Log-probs are always computed with `logprobs_from_hidden` (chunked, custom VJP): no [B, T, V]
logits exist in the forward or the backward pass.

Token hygiene: completions are decoded with the tokenizer only to call the reward function; the
training batch holds the sampled ids themselves (never decoded and re-encoded). Completion masks
come from the rollout's lengths (pad may equal EOS) and include the stop token.

Every jitted function here bumps a trace counter (`trace_counts()`) when it is traced, so tests
can check that a second step with the same shapes compiles nothing new.
"""

from __future__ import annotations

import collections
import functools
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rljax.ops.fused_logprobs import logprobs_from_hidden
from rljax.rollout.generate import Rollout, generate

Array = jax.Array

_TRACES: collections.Counter = collections.Counter()


def count_trace(name: str) -> None:
  """Records one trace of the jitted function `name` (a Python side effect: runs at trace time)."""
  _TRACES[name] += 1


def trace_counts() -> dict[str, int]:
  """How many times each instrumented jitted function has been traced (a copy)."""
  return dict(_TRACES)


class Experience(NamedTuple):
  """One batch of on-policy experience (a pytree; B rows, P prompt, N completion positions).

  Attributes:
    tokens: [B, P+N] int32 prompt then completion ids (pad after the stop token).
    attention_mask: [B, P+N] bool, prompt mask then completion mask.
    completion_mask: [B, N] bool, 1 on completion tokens (stop token included).
    rollout_logp: [B, N] float32 log-probs recorded by the sampler (0 outside the mask).
    old_logp: [B, N] log-probs of the trainer's own forward pass at the sampling parameters.
    ref_logp: [B, N] log-probs under the frozen reference (equal to old_logp when unused).
    scores: [B] float32 sequence rewards (after any overlong penalty).
    lengths: [B] int32 completion lengths; finished: [B] bool (False = truncated).
    advantages: [B, N] float32 token advantages (stop-gradient; 0 outside the mask).
    values: [B, N] critic values at sampling time (PPO; zeros otherwise).
    returns: [B, N] value targets (PPO; zeros otherwise).
  """

  tokens: Array
  attention_mask: Array
  completion_mask: Array
  rollout_logp: Array
  old_logp: Array
  ref_logp: Array
  scores: Array
  lengths: Array
  finished: Array
  advantages: Array
  values: Array
  returns: Array


# ----------------------------------------------------------------------------------------------
# Forward passes (pure, then jitted with a static graphdef and options).
# ----------------------------------------------------------------------------------------------


def completion_logprobs(
  model: Any,
  tokens: Array,
  attention_mask: Array,
  num_completion: int,
  *,
  temperature: float = 1.0,
  chunk_size: int = 64,
  return_entropy: bool = False,
):
  """[B, N] log-probs (and entropies) of the completion tokens under `model` (fused, no logits).

    logp[b, t] = log softmax(h[b, P+t−1] @ Wᵀ / temperature)[tokens[b, P+t]]

  Args:
    model: a `Transformer` (anything with `hidden_states` and `unembedding`).
    tokens: [B, P+N] ids; attention_mask: [B, P+N].
    num_completion: N (static).
    temperature: the sampling temperature (the rollout's log-probs use the same one).
    chunk_size: positions per chunk of `logprobs_from_hidden`.
    return_entropy: also return the [B, N] entropy of each position's distribution.
  """
  p = tokens.shape[1] - num_completion
  hidden = model.hidden_states(tokens, attention_mask)[:, p - 1 : -1]
  return logprobs_from_hidden(
    hidden,
    model.unembedding,
    tokens[:, p:],
    temperature=temperature,
    chunk_size=chunk_size,
    return_entropy=return_entropy,
  )


def completion_values(critic: Any, tokens: Array, attention_mask: Array, num_completion: int):
  """[B, N] critic values V(state before completion token t) = critic(...)[:, P+t−1]."""
  p = tokens.shape[1] - num_completion
  return critic(tokens, attention_mask)[:, p - 1 : -1]


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _policy_logprobs_jit(graphdef, params, frozen, tokens, attention_mask, completion_mask,
                         temperature, chunk_size):
  count_trace("policy_logprobs")
  model = nnx.merge(graphdef, params, frozen)
  logp, entropy = completion_logprobs(
    model, tokens, attention_mask, completion_mask.shape[1], temperature=temperature,
    chunk_size=chunk_size, return_entropy=True,
  )
  mask = completion_mask.astype(bool)
  return jnp.where(mask, logp, 0.0), jnp.where(mask, entropy, 0.0)


def policy_logprobs(
  graphdef: nnx.GraphDef,
  params: Any,
  frozen: Any,
  tokens: Array,
  attention_mask: Array,
  completion_mask: Array,
  *,
  temperature: float = 1.0,
  chunk_size: int = 64,
) -> tuple[Array, Array]:
  """Jitted (logp, entropy), both [B, N] and 0 outside `completion_mask`, of a policy given as
  (graphdef, params, frozen). One compiled program per shapes/options, shared by the old-policy
  and the reference forward passes (same graphdef, different parameters)."""
  return _policy_logprobs_jit(graphdef, params, frozen, tokens, attention_mask, completion_mask,
                              float(temperature), int(chunk_size))


@functools.partial(jax.jit, static_argnums=(0,))
def _critic_values_jit(graphdef, params, frozen, tokens, attention_mask, completion_mask):
  count_trace("critic_values")
  critic = nnx.merge(graphdef, params, frozen)
  values = completion_values(critic, tokens, attention_mask, completion_mask.shape[1])
  return jnp.where(completion_mask.astype(bool), values, 0.0)


def critic_values(graphdef, params, frozen, tokens, attention_mask, completion_mask) -> Array:
  """Jitted [B, N] float32 values of a `ValueModel` (graphdef, params, frozen); 0 off the mask."""
  return _critic_values_jit(graphdef, params, frozen, tokens, attention_mask, completion_mask)


# ----------------------------------------------------------------------------------------------
# Rollout + rewards (host side).
# ----------------------------------------------------------------------------------------------


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
  """

  rollout: Rollout
  scores: np.ndarray
  raw_scores: np.ndarray
  prompt_index: np.ndarray
  completions: list
  seconds: float
  step_rewards: np.ndarray | None = None
  step_mask: np.ndarray | None = None


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


def _outcome_scores(value: Any, batch: int) -> np.ndarray:
  if is_step_rewards(value):
    raise ValueError(
      "`reward_fn` returned per-step rewards (StepRewards) where one reward per completion is "
      "expected; train on step rewards with GRPOConfig(advantage=\"process\")."
    )
  scores = np.asarray(value, np.float32).reshape(-1)
  if scores.shape != (batch,):
    raise ValueError(f"`reward_fn` returned {scores.shape[0]} rewards for {batch} completions.")
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
  rollout: Rollout, *, process: bool | None = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """reward_fn(prompts, completions, **fields, prompt_tokens=, prompt_mask=, completion_tokens=,
  completion_mask=, completion_lengths=); extra keywords a function does not declare (and it
  has no **kwargs) are not passed.

  Returns float32 [B] scores (outcome rewards) or, for process rewards (a reward fn returning
  `StepRewards`), the checked (step_rewards float32 [B, N], step_mask bool [B, N]).
  `process`: False requires outcome rewards, True process rewards, None takes either (a
  ValueError names the mismatch).
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
  return _outcome_scores(out, len(completions))


def overlong_penalty(lengths: np.ndarray, *, max_length: int, buffer: int, penalty: float = 1.0):
  """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), scaled by `penalty`:

    0                                   if L ≤ L_max − buffer
    penalty · ((L_max − buffer) − L) / buffer   if L_max − buffer < L ≤ L_max
    −penalty                            if L > L_max
  with L_max = `max_length` (the rollout's max_new_tokens) and `buffer` the paper's L_cache.
  Returns float32 [B].
  """
  if not 0 < buffer <= max_length:
    raise ValueError(f"`overlong_buffer` must be in (0, {max_length}]; got {buffer!r}.")
  lengths = np.asarray(lengths, np.float64)
  start = max_length - buffer
  soft = np.where(lengths > start, (start - lengths) / buffer, 0.0)
  return (penalty * np.where(lengths > max_length, -1.0, soft)).astype(np.float32)


def collect_rollout(
  graphdef: nnx.GraphDef,
  params: Any,
  prompts: Any,
  key: Array,
  *,
  reward_fn: Callable,
  tokenizer: Any,
  num_samples: int,
  max_new_tokens: int,
  temperature: float,
  top_k: int | None,
  top_p: float | None,
  stop_tokens: Sequence[int],
  pad_id: int,
  overlong_buffer: int | None = None,
  overlong_penalty_coef: float = 1.0,
  process: bool | None = None,
) -> Scored:
  """Samples `num_samples` completions per prompt with `params` (from
  `OnPolicyTrainer.sampler_params`) and scores them on the host with `reward_fn` (see
  `call_reward_fn`; `process` as there, default: whichever kind the reward fn returns).

  The overlong penalty (`overlong_buffer`, DAPO) is added to the score of each row; for process
  rewards it is added to the reward at the row's last completion token, which becomes a step
  end (rows whose penalty is 0 are left unchanged), so the score stays the sum of step rewards.
  """
  start = time.perf_counter()
  out = generate(
    (graphdef, params), prompts.tokens, prompts.mask, key, max_new_tokens=max_new_tokens,
    temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, pad_id=pad_id,
    num_samples=num_samples,
  )
  rollout = Rollout(*jax.device_get(tuple(out)))
  seconds = time.perf_counter() - start
  completions = decode_completions(tokenizer, rollout)
  texts = repeat_rows(list(prompts.texts), num_samples)
  fields = {k: repeat_rows(list(v), num_samples) for k, v in dict(prompts.fields).items()}
  raw = call_reward_fn(reward_fn, texts, completions, fields, rollout, process=process)
  step_rewards = step_mask = None
  if isinstance(raw, tuple):
    step_rewards, step_mask = raw
    raw = step_reward_totals(step_rewards, step_mask)
  scores = raw
  if overlong_buffer is not None:
    penalty = overlong_penalty(rollout.lengths, max_length=max_new_tokens,
                               buffer=overlong_buffer, penalty=overlong_penalty_coef)
    scores = raw + penalty
    if step_rewards is not None:
      step_rewards, step_mask = add_at_last_token(step_rewards, step_mask, rollout.lengths,
                                                  penalty)
      scores = step_reward_totals(step_rewards, step_mask)
  index = np.repeat(np.arange(rollout.tokens.shape[0] // num_samples), num_samples)
  return Scored(rollout, scores.astype(np.float32), raw, index, completions, seconds,
                step_rewards, step_mask)


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
  return Scored(
    rollout, take(lambda s: s.scores), take(lambda s: s.raw_scores),
    take(lambda s: s.prompt_index), completions, sum(s.seconds for s in scored), *steps,
  )


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


def rollout_metrics(scored: Scored) -> dict[str, float]:
  """Host metrics of one rollout: reward mean/std, response length, truncation rate, tok/s."""
  r = scored.rollout
  lengths = np.asarray(r.lengths, np.float64)
  return {
    "reward_mean": float(np.mean(scored.scores)),
    "reward_std": float(np.std(scored.scores)),
    "raw_reward_mean": float(np.mean(scored.raw_scores)),
    "response_length": float(lengths.mean()),
    "truncation_rate": float(1.0 - np.mean(r.finished)),
    "tokens_per_second": float(lengths.sum() / max(scored.seconds, 1e-9)),
  }


def experience_arrays(scored: Scored) -> dict[str, Array]:
  """The device arrays of a scored rollout used by the trainers' forward passes."""
  r = scored.rollout
  return {
    "tokens": jnp.asarray(r.tokens, jnp.int32),
    "attention_mask": jnp.concatenate(
      [jnp.asarray(r.prompt_mask, bool), jnp.asarray(r.completion_mask, bool)], axis=1),
    "completion_mask": jnp.asarray(r.completion_mask, bool),
    "rollout_logp": jnp.asarray(r.logprobs, jnp.float32),
    "scores": jnp.asarray(scored.scores, jnp.float32),
    "lengths": jnp.asarray(r.lengths, jnp.int32),
    "finished": jnp.asarray(r.finished, bool),
  }


def minibatch_indices(batch: int, num_minibatches: int, rng: np.random.Generator) -> list:
  """A random permutation of the rows split into `num_minibatches` equal index arrays."""
  if batch % num_minibatches:
    raise ValueError(
      f"the batch of {batch} rows is not divisible by `num_minibatches` ({num_minibatches})."
    )
  return np.split(rng.permutation(batch), num_minibatches)


def take_rows(tree: Any, rows: np.ndarray) -> Any:
  """The rows `rows` of every [B, ...] leaf of `tree`."""
  idx = jnp.asarray(rows)
  return jax.tree.map(lambda x: jnp.take(x, idx, axis=0), tree)


def mean_metrics(history: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Means over updates of each metric (device scalars fetched once)."""
  fetched = jax.device_get(list(history))
  keys = fetched[0].keys() if fetched else ()
  return {k: float(np.mean([np.asarray(m[k], np.float64) for m in fetched])) for k in keys}


# ----------------------------------------------------------------------------------------------
# Exact normalizers for microbatched losses.
# ----------------------------------------------------------------------------------------------

TOKEN_AGGS = ("token-mean",)
SEQ_AGGS = ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def agg_count(mask: Array, agg: str) -> Array:
  """The outer denominator `aggregate(·, mask, agg)` divides by: Σ mask for "token-mean", the
  number of rows with a valid token for the seq-mean modes (float32 scalar)."""
  m = jnp.asarray(mask).astype(jnp.float32)
  if agg in TOKEN_AGGS:
    return jnp.sum(m)
  if agg in SEQ_AGGS:
    return jnp.sum((jnp.sum(m, axis=-1) != 0).astype(jnp.float32))
  raise ValueError(f"`agg` {agg!r} has no normalizer; valid: {TOKEN_AGGS + SEQ_AGGS}.")


def rescale_to_normalizer(loss: Array, mask: Array, agg: str, normalizer: Array | None) -> Array:
  """Turns a loss aggregated over this (micro)batch into its share of the global loss:
  loss · count(mask) / normalizer (`agg_count`), so microbatch losses sum to the full-batch
  value. `normalizer=None` returns `loss`. A zero normalizer gives 0."""
  if normalizer is None:
    return loss
  local = agg_count(mask, agg)
  norm = jnp.asarray(normalizer, jnp.float32)
  return jnp.where(norm > 0, loss * local / jnp.where(norm > 0, norm, 1.0), 0.0)


def accuracy_metrics(scored: Any, k: int) -> dict[str, float]:
  """{"accuracy", "reward_mean", "pass@k"} of k completions per prompt (a row is correct when its
  raw reward is > 0.5, the convention of 0/1 verifiers)."""
  correct = (scored.raw_scores > 0.5).reshape(-1, k)
  return {
    "accuracy": float(correct.mean()),
    "reward_mean": float(scored.raw_scores.mean()),
    f"pass@{k}": float(correct.any(axis=1).mean()),
  }
