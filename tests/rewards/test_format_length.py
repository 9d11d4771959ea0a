"""Format reward and length penalties (DAPO eq. 13 against an independent transcription)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.rewards.format import format_reward
from rljax.rewards.length import length_penalty, overlong_penalty, soft_overlong_penalty


def test_format_reward_search_and_fullmatch():
  fn = format_reward(r"<answer>.*</answer>")
  got = fn(None, ["x <answer>4</answer>", "<answer>\n4\n</answer>", "<answer>4", ""])
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, [1, 1, 0, 0])
  strict = format_reward(r"<think>.*?</think>\s*<answer>.*?</answer>", full_match=True)
  np.testing.assert_array_equal(
    strict(None, ["<think>a</think> <answer>1</answer>", "hi <think>a</think><answer>1</answer>"]),
    [1, 0],
  )


def test_format_reward_errors():
  with pytest.raises(ValueError, match="pattern"):
    format_reward("(unclosed")
  with pytest.raises(ValueError, match="`prompts` has length 1"):
    format_reward()(["a"], ["b", "c"])


def dapo_reference(length, max_length, cache):
  """DAPO eq. 13 transcribed case by case."""
  if length <= max_length - cache:
    return 0.0
  if length <= max_length:
    return ((max_length - cache) - length) / cache
  return -1.0


def test_overlong_penalty_hand_values():
  # max_length 16, cache 4: 0 up to 12, then -0.25 per token, -1 at 16 and beyond.
  got = soft_overlong_penalty([0, 12, 13, 14, 15, 16, 40], max_length=16, cache=4)
  np.testing.assert_allclose(got, [0, 0, -0.25, -0.5, -0.75, -1, -1])
  assert got.dtype == np.float32
  fn = overlong_penalty(16, 4, factor=0.5)
  np.testing.assert_allclose(fn(["p", "q"], ["a", "b"], completion_lengths=np.array([14, 20])),
                             [-0.25, -0.5])


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), st.lists(st.integers(0, 100), min_size=4,
                                                          max_size=4))
def test_overlong_penalty_matches_formula(max_length, cache, lengths):
  cache = min(cache, max_length)
  got = soft_overlong_penalty(lengths, max_length=max_length, cache=cache)
  want = [dapo_reference(n, max_length, cache) for n in lengths]
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert np.all(np.diff(got[np.argsort(lengths)]) <= 1e-7)  # non-increasing in length


def test_overlong_penalty_errors():
  with pytest.raises(ValueError, match="cache"):
    overlong_penalty(16, 17)
  with pytest.raises(ValueError, match="max_length"):
    overlong_penalty(0, 1)
  with pytest.raises(ValueError, match="factor"):
    overlong_penalty(16, 4, factor=-1.0)
  fn = overlong_penalty(16, 4)
  with pytest.raises(ValueError, match="completion_lengths"):
    fn(None, ["a"])
  with pytest.raises(ValueError, match="`completion_lengths` has length 2"):
    fn(None, ["a"], completion_lengths=[1, 2])


def test_length_penalty():
  fn = length_penalty(10, coef=0.5)
  np.testing.assert_allclose(fn(None, ["a", "b", "c"], completion_lengths=[0, 4, 30]),
                             [0.0, -0.2, -0.5], atol=1e-7)
  with pytest.raises(ValueError, match="coef"):
    length_penalty(10, coef=-1)
