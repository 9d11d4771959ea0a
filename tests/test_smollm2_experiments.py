"""The SmolLM2 experiments' generated data: disjoint splits and a verifier that separates pairs."""

import importlib.util
import pathlib
import sys

import numpy as np

from rljax.rewards import math_answer_reward

_PATH = pathlib.Path(__file__).parents[1] / "experiments" / "smollm2" / "word_problems.py"
_spec = importlib.util.spec_from_file_location("word_problems", _PATH)
wp = sys.modules["word_problems"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wp)


def test_splits_are_disjoint_and_deterministic():
  held_out = {p.question for p in wp.eval_problems(200, seed=0)}
  train = wp.train_problems(500, seed=0, num_eval=200)
  assert held_out.isdisjoint(p.question for p in train)
  assert [p.question for p in train] == [p.question for p in wp.train_problems(500, seed=0, num_eval=200)]


def test_chosen_answers_are_right_and_rejected_wrong_under_the_verifier():
  rows = wp.preference_rows(wp.train_problems(300, seed=1, num_eval=50), seed=3)
  prompts = [r["prompt"] for r in rows]
  answers = [str(p.answer) for p in wp.train_problems(300, seed=1, num_eval=50)]
  chosen = math_answer_reward(prompts, [r["chosen"] for r in rows], answer=answers)
  rejected = math_answer_reward(prompts, [r["rejected"] for r in rows], answer=answers)
  np.testing.assert_array_equal(chosen, 1.0)
  np.testing.assert_array_equal(rejected, 0.0)
