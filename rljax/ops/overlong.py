"""DAPO's soft overlong punishment of completion lengths (host arrays; one implementation for
the reward function `rljax.rewards.overlong_penalty` and the trainers' `overlong_cache`)."""

from __future__ import annotations

from typing import Any

import numpy as np


def soft_overlong_penalty(
  lengths: Any, *, max_length: int, cache: int, factor: float = 1.0
) -> np.ndarray:
  """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of token lengths, float32.

    R(L) = 0                                  L <= max_length − cache
         = ((max_length − cache) − L) / cache  max_length − cache < L <= max_length
         = −1                                  L > max_length
  times `factor` (verl's `overlong_penalty_factor`, default 1.0).

  Args:
    lengths: [B] completion lengths in tokens.
    max_length: L_max, the maximum generation length (DAPO: 20480).
    cache: L_cache, the soft punishment interval (DAPO: 4096); 1 <= cache <= max_length.
    factor: >= 0, scales the penalty.

  Returns:
    float32 [B] in [−factor, 0].

  Example:
    >>> soft_overlong_penalty([10, 14, 16, 20], max_length=16, cache=4)
    array([ 0. , -0.5, -1. , -1. ], dtype=float32)
  """
  if not isinstance(max_length, (int, np.integer)) or max_length < 1:
    raise ValueError(f"`max_length` must be an int >= 1; got {max_length!r}.")
  if not isinstance(cache, (int, np.integer)) or not 1 <= cache <= max_length:
    raise ValueError(f"`cache` must be an int in [1, max_length={max_length}]; got {cache!r}.")
  if not factor >= 0:
    raise ValueError(f"`factor` must be >= 0; got {factor!r}.")
  lengths = np.asarray(lengths, np.float64)
  expected = max_length - cache
  penalty = np.clip((expected - lengths) / cache, -1.0, 0.0)
  return (factor * penalty).astype(np.float32)
