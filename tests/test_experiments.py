"""The main job really learns: PPO and GRPO solve the toy sequence task from a random policy."""

import importlib.util
import math
import pathlib

import pytest

_PATH = pathlib.Path(__file__).parents[1] / "experiments" / "toy_sequence.py"
_spec = importlib.util.spec_from_file_location("toy_sequence", _PATH)
toy_sequence = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy_sequence)


@pytest.mark.slow
@pytest.mark.parametrize("algo,steps", [("ppo", 80), ("grpo", 150)])
def test_toy_sequence_learns(algo, steps):
  result = toy_sequence.train(algo, steps=steps, seed=0)
  assert result["first10"] < 0.2  # a random policy gets ~1/8 of the tokens right
  assert result["last10"] > 0.5 and result["greedy"] > 0.9
  assert all(math.isfinite(v) for v in result["metrics"].values())
