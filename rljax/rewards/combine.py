"""Weighted sums of reward functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rljax.rewards.base import as_rewards, batch_size


class CombinedReward:
  """Σ_i w_i · fn_i(prompts, completions, **fields), float32 [B]; see `combine_rewards`."""

  def __init__(self, terms: Sequence[tuple[Callable, float]], names: Sequence[str]):
    self.terms = list(terms)
    self.names = list(names)

  def components(
    self, prompts: Sequence[str] | None, completions: Sequence[str], **fields: Any
  ) -> dict[str, np.ndarray]:
    """{name: unweighted float32 [B] reward} of every term (names are unique)."""
    b = batch_size(prompts, completions)
    return {
      name: as_rewards(fn(prompts, completions, **fields), b, f"reward {name!r}")
      for name, (fn, _) in zip(self.names, self.terms)
    }

  def __call__(
    self, prompts: Sequence[str] | None, completions: Sequence[str], **fields: Any
  ) -> np.ndarray:
    parts = self.components(prompts, completions, **fields)
    total = np.zeros((len(completions),), np.float64)
    for (_, weight), value in zip(self.terms, parts.values()):
      total += weight * value.astype(np.float64)
    return total.astype(np.float32)


def _unique_names(fns: Sequence[Callable]) -> list[str]:
  names: list[str] = []
  for fn in fns:
    base = getattr(fn, "__name__", type(fn).__name__)
    name, k = base, 1
    while name in names:
      k += 1
      name = f"{base}_{k}"
    names.append(name)
  return names


def combine_rewards(
  terms: Sequence[tuple[Callable, float]], *, names: Sequence[str] | None = None
) -> CombinedReward:
  """A reward function that is the weighted sum of several.

    r_b = Σ_i w_i · r_i,b          (summed in float64, returned as float32)

  Every term gets the same (prompts, completions, **fields) and ignores the fields it does not
  use. `.components(...)` returns the unweighted terms by name (for logging).

  Args:
    terms: non-empty list of (reward_fn, weight) pairs; weights are finite floats (may be
      negative or 0).
    names: optional names of the terms (default: each function's __name__, made unique).

  Returns:
    A `CombinedReward` (callable like any reward function).

  Raises:
    ValueError: empty `terms`, a term that is not a (callable, number) pair, a non-finite
      weight, or `names` of the wrong length / with duplicates.

  Example:
    >>> fn = combine_rewards([(math_answer_reward, 1.0), (format_reward(), 0.1)])
    >>> fn(prompts, completions, answer=answers)
  """
  terms = list(terms)
  if not terms:
    raise ValueError("`terms` must hold at least one (reward_fn, weight) pair.")
  for i, term in enumerate(terms):
    if not (isinstance(term, (tuple, list)) and len(term) == 2 and callable(term[0])):
      raise ValueError(f"`terms[{i}]` must be a (reward_fn, weight) pair; got {term!r}.")
    if not np.isfinite(float(term[1])):
      raise ValueError(f"`terms[{i}]` has a non-finite weight {term[1]!r}.")
  terms = [(fn, float(w)) for fn, w in terms]
  if names is None:
    names = _unique_names([fn for fn, _ in terms])
  elif len(names) != len(terms) or len(set(names)) != len(names):
    raise ValueError(f"`names` must be {len(terms)} unique names; got {list(names)!r}.")
  return CombinedReward(terms, names)
