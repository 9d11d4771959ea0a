"""Format reward: 1.0 when a completion contains (or is) a required pattern."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from rljax.rewards.base import batch_size


def format_reward(
  pattern: str | re.Pattern = r"<answer>.*?</answer>",
  *,
  full_match: bool = False,
  flags: int = re.DOTALL,
):
  """A reward function scoring 1.0 when `pattern` matches the completion, else 0.0.

    r_b = 1[re.search(pattern, completions[b])]        (re.fullmatch when full_match=True)

  Args:
    pattern: a regular expression (string or compiled); default "<answer>.*?</answer>".
      DeepSeek-R1-style "think then answer" is r"^<think>.*?</think>\\s*<answer>.*?</answer>$"
      with `full_match=True` (TRL's `think_format_reward` convention).
    full_match: the whole completion must match (default False: a match anywhere).
    flags: re flags for a string pattern; default re.DOTALL so ".*" spans lines.

  Returns:
    `fn(prompts, completions, **fields) -> float32 [B]` of 0.0 / 1.0.

  Raises:
    ValueError: `pattern` is not a valid regular expression (named in the message).

  Example:
    >>> fn = format_reward(r"<answer>.*</answer>")
    >>> fn(None, ["<answer>4</answer>", "4"])
    array([1., 0.], dtype=float32)
  """
  try:
    regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags)
  except re.error as err:
    raise ValueError(f"`pattern` {pattern!r} is not a valid regular expression: {err}") from err
  match = regex.fullmatch if full_match else regex.search

  def reward(prompts: Sequence[str] | None, completions: Sequence[str], **fields: Any) -> np.ndarray:
    b = batch_size(prompts, completions)
    return np.asarray([float(match(c) is not None) for c in completions], np.float32).reshape(b)

  reward.__name__ = "format_reward"
  return reward
