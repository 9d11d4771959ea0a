"""Length rewards: DAPO's soft overlong punishment and a linear length penalty.

Both read the token lengths of the completions from the `completion_lengths` field (the rljax
trainers pass it; stop token included), never re-tokenize the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rljax.ops.overlong import soft_overlong_penalty
from rljax.rewards.base import batch_size, require_field

__all__ = ["length_penalty", "overlong_penalty", "soft_overlong_penalty"]


def _lengths(completion_lengths: Any, fn_name: str) -> np.ndarray:
  require_field("completion_lengths", completion_lengths, fn_name)
  lengths = np.asarray(completion_lengths, np.float64)
  if lengths.ndim != 1:
    raise ValueError(f"`completion_lengths` must have rank 1; got shape {lengths.shape}.")
  return lengths


def _reward_of_lengths(name: str, penalty) -> Any:
  """A reward function `fn(prompts, completions, *, completion_lengths, **fields)` applying
  `penalty(lengths [B] float64) -> float32 [B]`."""

  def reward(
    prompts: Sequence[str] | None,
    completions: Sequence[str],
    *,
    completion_lengths: Any = None,
    **fields: Any,
  ) -> np.ndarray:
    lengths = _lengths(completion_lengths, name)
    batch_size(prompts, completions, completion_lengths=lengths)
    return penalty(lengths)

  reward.__name__ = name
  return reward


def overlong_penalty(max_length: int, cache: int, *, factor: float = 1.0):
  """A reward function applying `soft_overlong_penalty` to the `completion_lengths` field.

  Add it to a task reward with `combine_rewards([(task, 1.0), (overlong_penalty(N, c), 1.0)])`.
  With the trainer's `max_new_tokens` as `max_length`, a completion truncated at N tokens gets −1.

  Args:
    max_length: L_max (e.g. the rollout's max_new_tokens).
    cache: L_cache, the length of the linear ramp from 0 to −1.
    factor: scale of the penalty (default 1.0).

  Returns:
    `fn(prompts, completions, *, completion_lengths, **fields) -> float32 [B]`.

  Raises:
    ValueError: bad max_length / cache / factor (at construction), or a missing or
      mismatched `completion_lengths` (at call).

  Example:
    >>> fn = overlong_penalty(16, 4)
    >>> fn(None, ["a", "b"], completion_lengths=[12, 14])
    array([ 0. , -0.5], dtype=float32)
  """
  soft_overlong_penalty([], max_length=max_length, cache=cache, factor=factor)  # validates
  return _reward_of_lengths(
    "overlong_penalty",
    lambda lengths: soft_overlong_penalty(lengths, max_length=max_length, cache=cache, factor=factor),
  )


def length_penalty(max_length: int, *, coef: float = 1.0):
  """A reward function penalising length linearly: r_b = −coef · min(L_b, max_length) / max_length.

  The plain "shorter is better" shaping (e.g. the length-penalty baseline of Kimi k1.5 without its
  correctness coupling); values lie in [−coef, 0].

  Args:
    max_length: the length at which the penalty reaches −coef (int >= 1).
    coef: >= 0, the penalty at max_length.

  Returns:
    `fn(prompts, completions, *, completion_lengths, **fields) -> float32 [B]`.

  Example:
    >>> length_penalty(10, coef=0.5)(None, ["a"], completion_lengths=[4])
    array([-0.2], dtype=float32)
  """
  if not isinstance(max_length, (int, np.integer)) or max_length < 1:
    raise ValueError(f"`max_length` must be an int >= 1; got {max_length!r}.")
  if not coef >= 0:
    raise ValueError(f"`coef` must be >= 0; got {coef!r}.")
  return _reward_of_lengths(
    "length_penalty",
    lambda lengths: (-coef * np.minimum(lengths, max_length) / max_length).astype(np.float32),
  )
