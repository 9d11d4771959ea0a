"""The reward-function protocol and the argument checks shared by the reward functions.

A reward function is a host-side callable

  fn(prompts: list[str], completions: list[str], **fields) -> np.ndarray float32 [B]

`fields` are extra per-row columns, each of length B: dataset columns (e.g. `answer=[...]`) and,
when called by the rljax trainers (`rljax.train.grpo`, `rljax.train.ppo`), the rollout's
token-level fields

  prompt_tokens       [B, P] int   the left-padded prompt ids (repeated per sample)
  prompt_mask         [B, P] bool  1 on real prompt tokens
  completion_tokens   [B, N] int   the sampled ids (pad after the stop token)
  completion_mask     [B, N] bool  1 on the completion tokens, stop token included
  completion_lengths  [B]    int   completion lengths in tokens, stop token included

Every reward function accepts and ignores the fields it does not use, so one call signature
serves all of them (and `combine_rewards`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class RewardFn(Protocol):
  """`fn(prompts, completions, **fields) -> float32 [B]` (see the module docstring)."""

  def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> np.ndarray:
    ...


def batch_size(prompts: Sequence[Any], completions: Sequence[Any], **fields: Any) -> int:
  """B = len(completions); raises ValueError naming any argument whose length differs.

  `prompts` may be None (some reward functions do not read it); fields that are None are skipped.
  """
  b = len(completions)
  named = {"prompts": prompts, **fields}
  for name, value in named.items():
    if value is None:
      continue
    n = len(value)
    if n != b:
      raise ValueError(
        f"`{name}` has length {n} but `completions` has length {b}; every field needs one entry "
        "per completion."
      )
  return b


def require_field(name: str, value: Any, fn_name: str) -> Any:
  """Raises ValueError naming the missing field `name` that reward `fn_name` needs."""
  if value is None:
    raise ValueError(f"`{fn_name}` needs the field `{name}=` (one entry per completion).")
  return value


def as_rewards(values: Any, b: int, fn_name: str = "reward function") -> np.ndarray:
  """float32 [b] array from `values`; raises ValueError if the shape is not [b]."""
  out = np.asarray(values, dtype=np.float32)
  if out.shape != (b,):
    raise ValueError(f"{fn_name} returned shape {out.shape}; expected ({b},).")
  return out
