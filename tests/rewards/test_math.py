"""Final-answer extraction, number normalisation and the math reward (hand-written cases)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.rewards.math import (
  answers_match,
  extract_final_answer,
  math_answer_reward,
  parse_number,
)


@pytest.mark.parametrize("text, expected", [
  ("Natalia sold 48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72", "72"),
  ("#### 1 then more\n#### 5", "5"),                      # the last marker wins
  ("So the result is \\boxed{42}.", "42"),
  ("\\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # last boxed, nested braces
  ("I think the answer is 17 apples.", "17 apples."),
  ("THE ANSWER IS: -3", "-3"),
  ("2 + 3 = 5, then 5 * 2 = 10", "10"),                   # last number
  ("It costs $1,234.50 in total", "1,234.50"),
  ("no digits here", None),
  ("", None),
])
def test_extract_final_answer(text, expected):
  assert extract_final_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
  ("42", 42.0), ("1,234", 1234.0), ("7.0", 7.0), ("7.", 7.0), ("-0.50", -0.5), (".5", 0.5),
  ("+3", 3.0), ("3/4", 0.75), ("\\frac{3}{4}", 0.75), ("$5", 5.0), ("50%", 50.0),
  ("17 apples.", 17.0), (12, 12.0), (2.5, 2.5), ("abc", None), (None, None), ("1/0", None),
])
def test_parse_number(text, expected):
  assert parse_number(text) == expected


def test_answers_match_tolerance():
  assert answers_match("7.0000001", "7")
  assert not answers_match("7.001", "7")
  assert answers_match("1,000", 1000)
  assert answers_match("3/4", "0.75")
  assert not answers_match(None, "7")
  assert answers_match("72", "Natalia ... = 72\n#### 72")  # a full GSM8K solution as reference


def test_math_answer_reward_values():
  completions = ["... #### 72", "so \\boxed{3/4}", "The answer is 1,000.", "I get 5 then 6",
                 "nothing", "The answer is 8"]
  answers = ["72", "0.75", 1000, "5", "3", "8.0"]
  got = math_answer_reward(["p"] * 6, completions, answer=answers)
  assert got.dtype == np.float32 and got.shape == (6,)
  np.testing.assert_array_equal(got, [1, 1, 1, 0, 0, 1])


def test_math_answer_reward_errors():
  with pytest.raises(ValueError, match="answer"):
    math_answer_reward(["p"], ["1"])
  with pytest.raises(ValueError, match="`answer` has length 2"):
    math_answer_reward(["p"], ["1"], answer=["1", "2"])
  with pytest.raises(ValueError, match="`prompts` has length 2"):
    math_answer_reward(["p", "q"], ["1"], answer=["1"])


def test_math_answer_reward_ignores_extra_fields_and_empty_batch():
  got = math_answer_reward(None, ["3"], answer=["3"], completion_lengths=[4], other=["x"])
  np.testing.assert_array_equal(got, [1.0])
  assert math_answer_reward([], [], answer=[]).shape == (0,)


@settings(max_examples=20, deadline=None)
@given(st.integers(-10**9, 10**9), st.sampled_from(["#### {}", "\\boxed{{{}}}", "The answer is {}.",
                                                    "blah 1 2 {}"]))
def test_integer_roundtrip_property(n, template):
  """Any integer written in any supported form (with or without thousands commas) is matched."""
  for written in (str(n), f"{n:,}"):
    text = template.format(written)
    assert math_answer_reward(None, [text], answer=[n])[0] == 1.0
    assert math_answer_reward(None, [text], answer=[n + 1])[0] == 0.0
