"""Process rewards: step ends against hand-computed indices, StepRewards, process_reward."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rljax.rewards import StepRewards, process_reward, step_ends

from tiny_tokenizer import tiny_tokenizer


@pytest.mark.parametrize("tokens, length, delimiters, want", [
  ([7, 9, 7, 9, 2, 0], 5, 9, [1, 3, 4]),          # two delimiters, then the last token
  ([7, 7, 9, 0, 0, 0], 3, 9, [2]),                # delimiter as the last token: counted once
  ([7, 9, 0, 9, 9, 9], 1, [9], [0]),              # delimiters after the completion are ignored
  ([9, 9, 9, 0, 0, 0], 3, (9,), [0, 1, 2]),       # every token a delimiter
  ([7, 9, 5, 7, 5, 5], 6, [9, 7], [0, 1, 3, 5]),  # several delimiter ids
  ([7, 9, 5, 0, 0, 0], 3, [], [2]),               # no delimiters: one step
  ([9, 9, 9, 0, 0, 0], 0, 9, []),                 # empty completion: no step
], ids=["two", "last", "after_end", "all", "several_ids", "no_delims", "empty"])
def test_step_ends_hand_computed(tokens, length, delimiters, want):
  assert step_ends(np.array([tokens]), np.array([length]), delimiters) == [want]


def test_step_ends_batch_and_errors():
  tokens = np.array([[1, 9, 2], [9, 1, 1]])
  assert step_ends(tokens, [3, 2], 9) == [[1, 2], [0, 1]]
  with pytest.raises(ValueError, match="completion_lengths` must lie in"):
    step_ends(tokens, [4, 1], 9)
  with pytest.raises(ValueError, match="completion_lengths` has shape"):
    step_ends(tokens, [3], 9)
  with pytest.raises(ValueError, match="completion_tokens` must have rank 2"):
    step_ends(tokens[0], [3], 9)
  with pytest.raises(ValueError, match="delimiter_ids"):
    step_ends(tokens, [3, 2], ["\n"])


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=6, max_size=6), st.integers(0, 6))
def test_step_ends_cut_the_completion_into_delimiter_terminated_spans(row, length):
  """Spans (end_{k-1}, end_k] tile [0, L); a delimiter appears only as a span's last token."""
  delims = {1, 3}
  ends = step_ends(np.array([row]), np.array([length]), sorted(delims))[0]
  assert ends == sorted(set(ends)) and all(0 <= e < length for e in ends)
  assert (ends[-1] == length - 1) if length else ends == []
  starts = [0] + [e + 1 for e in ends[:-1]]
  for s, e in zip(starts, ends):
    assert not any(row[t] in delims for t in range(s, e))  # none strictly inside a step
    assert row[e] in delims or e == length - 1


def test_step_rewards_from_steps_and_errors():
  sr = StepRewards.from_steps([[(1, 0.5), (3, -1.0)], [], [(0, 2.0)]], num_tokens=4)
  np.testing.assert_array_equal(sr.rewards, [[0, 0.5, 0, -1], [0, 0, 0, 0], [2, 0, 0, 0]])
  np.testing.assert_array_equal(sr.step_mask, [[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
  assert sr.rewards.dtype == np.float32 and sr.step_mask.dtype == bool
  with pytest.raises(ValueError, match="row 0: step end 4 is outside"):
    StepRewards.from_steps([[(4, 1.0)]], num_tokens=4)
  with pytest.raises(ValueError, match="row 1: two steps end at token 2"):
    StepRewards.from_steps([[], [(2, 1.0), (2, 0.0)]], num_tokens=4)
  with pytest.raises(ValueError, match="row 0: the reward"):
    StepRewards.from_steps([[(0, float("nan"))]], num_tokens=4)
  with pytest.raises(ValueError, match="num_tokens"):
    StepRewards.from_steps([[]], num_tokens=0)


# Row 0: steps [5, 9] [6, 6, 9] [2]; row 1: one step [6, 2]; row 2: empty (no step).
TOKENS = np.array([[5, 9, 6, 6, 9, 2], [6, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
LENGTHS = np.array([6, 2, 0])


def test_process_reward_token_ids_scorer():
  calls = []

  def scorer(prompt, steps, *, answer, completion_mask, **fields):
    calls.append((prompt, steps, answer, completion_mask.tolist()))
    return [len(s) + 0.5 * s.count(answer) for s in steps]

  fn = process_reward(scorer, delimiter_ids=9)
  mask = np.arange(6)[None] < LENGTHS[:, None]
  out = fn(["p0", "p1", "p2"], ["c0", "c1", "c2"], completion_tokens=TOKENS,
           completion_lengths=LENGTHS, completion_mask=mask, answer=[5, 6, 6])
  assert isinstance(out, StepRewards)
  want = np.zeros((3, 6))
  want[0, 1], want[0, 4], want[0, 5] = 2 + 0.5, 3, 1  # [5, 9] holds one 5
  want[1, 1] = 2 + 0.5  # [6, 2] holds one 6
  np.testing.assert_array_equal(out.rewards, want)
  np.testing.assert_array_equal(out.step_mask, want != 0)
  assert calls == [  # the empty row is not scored
    ("p0", [[5, 9], [6, 6, 9], [2]], 5, [True] * 6),
    ("p1", [[6, 2]], 6, [True, True] + [False] * 4),
  ]


def test_process_reward_decodes_steps_with_a_tokenizer():
  tok = tiny_tokenizer()
  ids = tok.convert_tokens_to_ids(["2", "+", "3", "?", "5", "</s>"])
  seen = []

  def scorer(prompt, steps, **fields):
    seen.append(steps)
    return [float("5" in s) for s in steps]

  fn = process_reward(scorer, delimiter_ids=[tok.convert_tokens_to_ids("?")], tokenizer=tok)
  out = fn(None, ["2 + 3 ? 5"], completion_tokens=np.array([ids]), completion_lengths=[6])
  # Steps are the spans [0, 3] and [4, 5], each decoded on its own; the stop token is skipped.
  assert seen == [[tok.decode(ids[:4], skip_special_tokens=True), "5"]]
  assert seen[0][0].replace(" ", "") == "2+3?"
  np.testing.assert_array_equal(out.rewards, [[0, 0, 0, 0, 0, 1]])
  np.testing.assert_array_equal(out.step_mask, [[0, 0, 0, 1, 0, 1]])


def test_process_reward_errors():
  fn = process_reward(lambda prompt, steps, **f: [0.0], delimiter_ids=9)
  with pytest.raises(ValueError, match="returned 1 scores for row 0, which has 3 steps"):
    fn(None, ["a", "b", "c"], completion_tokens=TOKENS, completion_lengths=LENGTHS)
  with pytest.raises(ValueError, match="needs the field `completion_tokens=`"):
    fn(None, ["a", "b", "c"], completion_lengths=LENGTHS)
  with pytest.raises(ValueError, match="needs the field `completion_lengths=`"):
    fn(None, ["a", "b", "c"], completion_tokens=TOKENS)
  with pytest.raises(ValueError, match="`answer` has length 2"):
    fn(None, ["a", "b", "c"], completion_tokens=TOKENS, completion_lengths=LENGTHS,
       answer=[1, 2])
  nan = process_reward(lambda prompt, steps, **f: [float("inf")] * len(steps), delimiter_ids=9)
  with pytest.raises(ValueError, match="row 0: the reward"):
    nan(None, ["a", "b", "c"], completion_tokens=TOKENS, completion_lengths=LENGTHS)
  with pytest.raises(ValueError, match="step_scorer"):
    process_reward("not callable", delimiter_ids=9)
  with pytest.raises(ValueError, match="delimiter_ids"):
    process_reward(lambda p, s, **f: s, delimiter_ids=[1.5])
