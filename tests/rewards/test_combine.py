"""Weighted combination of reward functions."""

from __future__ import annotations

import numpy as np
import pytest

from rljax.rewards.combine import combine_rewards
from rljax.rewards.format import format_reward
from rljax.rewards.length import overlong_penalty
from rljax.rewards.math import math_answer_reward


def test_weighted_sum_and_components():
  fn = combine_rewards([(math_answer_reward, 1.0), (format_reward(r"<answer>"), 0.25),
                        (overlong_penalty(8, 4), 2.0)])
  completions = ["<answer> 5", "6", "<answer> 7"]
  fields = {"answer": [5, 5, 5], "completion_lengths": [3, 6, 9]}
  got = fn(["p"] * 3, completions, **fields)
  # math [1, 0, 0]; format [1, 0, 1]; overlong [0, -0.5, -1]
  np.testing.assert_allclose(got, [1.25, -1.0, 0.25 - 2.0], atol=1e-6)
  assert got.dtype == np.float32 and got.shape == (3,)
  parts = fn.components(["p"] * 3, completions, **fields)
  assert list(parts) == ["math_answer_reward", "format_reward", "overlong_penalty"]
  np.testing.assert_array_equal(parts["format_reward"], [1, 0, 1])


def test_duplicate_names_are_made_unique():
  fn = combine_rewards([(format_reward("a"), 1.0), (format_reward("b"), -1.0)])
  assert fn.names == ["format_reward", "format_reward_2"]
  np.testing.assert_array_equal(fn(None, ["a", "b", "ab"]), [1, -1, 0])


def test_errors():
  with pytest.raises(ValueError, match="terms"):
    combine_rewards([])
  with pytest.raises(ValueError, match=r"terms\[0\]"):
    combine_rewards([math_answer_reward])
  with pytest.raises(ValueError, match="non-finite"):
    combine_rewards([(math_answer_reward, float("nan"))])
  with pytest.raises(ValueError, match="names"):
    combine_rewards([(math_answer_reward, 1.0)], names=["a", "b"])
  bad = combine_rewards([(lambda p, c, **f: np.zeros(len(c) + 1), 1.0)], names=["bad"])
  with pytest.raises(ValueError, match="'bad' returned shape"):
    bad(None, ["x"])
  with pytest.raises(ValueError, match="`answer` has length 1"):
    combine_rewards([(math_answer_reward, 1.0)])(None, ["1", "2"], answer=["1"])
