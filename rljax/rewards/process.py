"""Process rewards: one reward per reasoning step, for GRPO process supervision.

A completion is cut into steps at delimiter tokens (e.g. the id of "\\n\\n" or of a "Step"
marker): a step ENDS at each delimiter token inside the completion and at the completion's last
token (`step_ends`). A process reward function scores every step and returns `StepRewards`, the
step rewards laid out on the completion's tokens:

  rewards[b, t]    the reward of the step of row b that ends at completion token t, 0 elsewhere
  step_mask[b, t]  True at the step ends

which is exactly the input of `rljax.ops.grpo_process_advantages` (Shao et al. 2024, §4.1.3).
`GRPOTrainer` with `GRPOConfig(advantage="process")` expects its reward function to return
`StepRewards`; `process_reward` builds such a function from a per-completion step scorer (a
process reward model, a verifier of intermediate results, ...).

Reward functions run on the host (numpy); see `rljax.rewards.base` for the fields the trainers
pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from rljax.rewards.base import batch_size, require_field


class StepRewards(NamedTuple):
  """Per-step rewards of B completions of N token slots (host arrays).

  Attributes:
    rewards: [B, N] float32; the reward of each step at the completion token where that step ends,
      0 elsewhere.
    step_mask: [B, N] bool; True at step ends (which lie on completion tokens).

  Example:
    >>> StepRewards.from_steps([[(1, 0.5), (3, 1.0)], []], num_tokens=4).step_mask
    array([[False,  True, False,  True],
           [False, False, False, False]])
  """

  rewards: np.ndarray
  step_mask: np.ndarray

  @classmethod
  def from_steps(cls, steps: Sequence[Sequence[tuple[int, float]]], *,
                 num_tokens: int) -> StepRewards:
    """`StepRewards` from per-row lists of (end_token_index, reward).

    Args:
      steps: B lists of (t, r) pairs: the step ending at completion token t has reward r;
        indices in [0, num_tokens), at most one step per index; an empty list is a row with no
        step.
      num_tokens: N, the completion length of the rollout (its `max_new_tokens`).

    Raises:
      ValueError: an index outside [0, num_tokens), a repeated index, or a non-finite reward,
        naming the row.
    """
    if not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
      raise ValueError(f"`num_tokens` must be an int >= 1; got {num_tokens!r}.")
    rewards = np.zeros((len(steps), num_tokens), np.float32)
    mask = np.zeros((len(steps), num_tokens), bool)
    for b, row in enumerate(steps):
      for t, r in row:
        if not 0 <= t < num_tokens:
          raise ValueError(f"`steps` row {b}: step end {t} is outside [0, {num_tokens}).")
        if mask[b, t]:
          raise ValueError(f"`steps` row {b}: two steps end at token {t}.")
        if not np.isfinite(r):
          raise ValueError(f"`steps` row {b}: the reward of the step ending at {t} is {r!r}.")
        rewards[b, t], mask[b, t] = r, True
    return cls(rewards, mask)


def _delimiter_set(delimiter_ids: int | Sequence[int]) -> set[int]:
  ids = [delimiter_ids] if isinstance(delimiter_ids, (int, np.integer)) else list(delimiter_ids)
  if not all(isinstance(i, (int, np.integer)) for i in ids):
    raise ValueError(
      f"`delimiter_ids` must be an int or a sequence of ints; got {delimiter_ids!r}.")
  return {int(i) for i in ids}


def step_ends(completion_tokens: Any, completion_lengths: Any,
              delimiter_ids: int | Sequence[int]) -> list[list[int]]:
  """Per row, the completion token indices where a step ends (sorted, no repeats).

    ends_b = {t < L_b : tokens[b, t] ∈ delimiter_ids} ∪ {L_b − 1}     (∅ when L_b = 0)

  The last step ends at the last completion token (the stop token when the row finished), so
  every completion token belongs to exactly one step: step k spans (end_{k−1}, end_k].

  Args:
    completion_tokens: [B, N] int sampled ids (anything after L_b is ignored).
    completion_lengths: [B] int completion lengths L_b in [0, N] (stop token included).
    delimiter_ids: the token id(s) that end a step; an empty sequence makes each completion one
      step.

  Returns:
    B lists of int indices.

  Example:
    >>> step_ends([[7, 9, 7, 9, 2, 0]], [5], delimiter_ids=9)
    [[1, 3, 4]]
  """
  delims = _delimiter_set(delimiter_ids)
  tokens = np.asarray(completion_tokens)
  lengths = np.asarray(completion_lengths)
  if tokens.ndim != 2:
    raise ValueError(f"`completion_tokens` must have rank 2; got shape {tokens.shape}.")
  if lengths.shape != (tokens.shape[0],):
    raise ValueError(f"`completion_lengths` has shape {lengths.shape} but `completion_tokens` "
                     f"has shape {tokens.shape}; expected ({tokens.shape[0]},).")
  if lengths.size and (lengths.min() < 0 or lengths.max() > tokens.shape[1]):
    raise ValueError(f"`completion_lengths` must lie in [0, {tokens.shape[1]}]; got "
                     f"{lengths.tolist()}.")
  out = []
  for row, n in zip(tokens, lengths):
    n = int(n)
    ends = {t for t in range(n) if int(row[t]) in delims}
    out.append(sorted(ends | {n - 1}) if n else [])
  return out


def _step_spans(row: np.ndarray, ends: list[int]) -> list[list[int]]:
  """The token ids of each step: (previous end, end] (delimiter included)."""
  starts = [0] + [e + 1 for e in ends[:-1]]
  return [row[s : e + 1].tolist() for s, e in zip(starts, ends)]


def _row_fields(fields: dict[str, Any], b: int) -> dict[str, Any]:
  return {k: (None if v is None else v[b]) for k, v in fields.items()}


def process_reward(step_scorer: Callable[..., Sequence[float]], *,
                   delimiter_ids: int | Sequence[int], tokenizer: Any = None) -> Callable:
  """A process reward function from a per-completion step scorer.

  For each row b, the completion is cut into steps (`step_ends`) and

    scores = step_scorer(prompts[b], steps_b, **fields_b)      one float per step
    StepRewards: rewards[b, end_k] = scores[k], step_mask[b, end_k] = True

  Each step is the text of its tokens (delimiter included), decoded with
  `tokenizer.batch_decode(..., skip_special_tokens=True)`, or the list of its token ids when
  `tokenizer` is None (then the stop token is part of the last step). `fields_b` holds row b of
  every other field the caller passed (dataset columns such as `answer`, and the trainers' token
  fields `prompt_tokens`, `completion_tokens`, `completion_mask`, `completion_lengths`, ...), so
  the scorer should accept **fields. Rows with no step (empty completions) are not scored.

  Args:
    step_scorer: `fn(prompt, steps: list[str] | list[list[int]], **row_fields) -> Sequence[float]`.
    delimiter_ids: the token id(s) that end a step (e.g. the ids of "\\n\\n").
    tokenizer: decodes the steps; None passes token-id lists.

  Returns:
    `fn(prompts, completions, *, completion_tokens, completion_lengths, **fields) -> StepRewards`
    ([B, N] arrays, N = completion_tokens.shape[1]); `completion_tokens` and
    `completion_lengths` are required (the rljax trainers pass them).

  Raises (from the returned function):
    ValueError: a missing token field, fields of the wrong length, or a scorer that does not
      return exactly one finite score per step (naming the row and both counts).

  Example:
    >>> def scorer(prompt, steps, **fields):
    ...   return [float("=" in s) for s in steps]
    >>> reward_fn = process_reward(scorer, delimiter_ids=[newline_id], tokenizer=tokenizer)
    >>> trainer = GRPOTrainer(graphdef, optimizer, GRPOConfig(advantage="process"), reward_fn,
    ...                       tokenizer, stop_tokens=[eos], pad_id=eos)
  """
  if not callable(step_scorer):
    raise ValueError(f"`step_scorer` must be callable; got {step_scorer!r}.")
  _delimiter_set(delimiter_ids)

  def reward(prompts: Sequence[Any] | None, completions: Sequence[Any], *,
             completion_tokens: Any = None, completion_lengths: Any = None,
             **fields: Any) -> StepRewards:
    name = getattr(step_scorer, "__name__", "process_reward")
    tokens = np.asarray(require_field("completion_tokens", completion_tokens, name))
    lengths = np.asarray(require_field("completion_lengths", completion_lengths, name))
    b = batch_size(prompts, completions, completion_tokens=tokens, completion_lengths=lengths,
                   **fields)
    ends = step_ends(tokens, lengths, delimiter_ids)
    spans = [_step_spans(row, e) for row, e in zip(tokens, ends)]
    steps = spans
    if tokenizer is not None:
      flat = tokenizer.batch_decode([s for row in spans for s in row], skip_special_tokens=True)
      offsets = np.cumsum([0] + [len(row) for row in spans])
      steps = [list(flat[offsets[i] : offsets[i + 1]]) for i in range(b)]
    all_fields = {"completion_tokens": tokens, "completion_lengths": lengths, **fields}
    rows = []
    for i in range(b):
      if not ends[i]:
        rows.append([])
        continue
      prompt = None if prompts is None else prompts[i]
      scores = [float(s) for s in step_scorer(prompt, steps[i], **_row_fields(all_fields, i))]
      if len(scores) != len(ends[i]):
        raise ValueError(f"`step_scorer` returned {len(scores)} scores for row {i}, which has "
                         f"{len(ends[i])} steps; it must return one score per step.")
      rows.append(list(zip(ends[i], scores)))
    return StepRewards.from_steps(rows, num_tokens=tokens.shape[1])

  reward.__name__ = f"process_reward_{getattr(step_scorer, '__name__', 'scorer')}"
  return reward
