"""The addition main job: the task's pieces, and a short run where GRPO lifts greedy accuracy by
at least 30 points over the SFT model (one fixed seed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.addition.task import (  # noqa: E402
  carry_dropped_sum,
  char_tokenizer,
  demonstrations,
  exact_match_reward,
  has_carry,
  preference_pairs,
  prompt_rows,
  prompt_text,
  sample_problems,
  written,
)


def test_char_tokenizer_round_trip():
  tok = char_tokenizer()
  ids = tok("654+987=")["input_ids"]
  assert ids[0] == tok.bos_token_id and len(ids) == 9
  assert tok.convert_ids_to_tokens(ids[1:]) == list("654+987=")
  response = tok("5421", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
  assert tok.decode(response, skip_special_tokens=True) == "5421"
  assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3


def test_carry_dropped_sum_hand_values():
  assert carry_dropped_sum(456, 789, 3) == 1135  # 6+9→5, 5+8→3, 4+7→11
  assert carry_dropped_sum(95, 17, 2) == 102
  assert carry_dropped_sum(123, 456, 3) == 579 and not has_carry(123, 456, 3)
  assert carry_dropped_sum(5, 789, 3) == 784 and has_carry(5, 789, 3)
  assert carry_dropped_sum(900, 800, 3) == 1700 and not has_carry(900, 800, 3)  # leading column


def test_formats():
  assert prompt_text(7, 452, 3) == "700+254=" and prompt_text(7, 452, 3, False) == "007+452="
  assert written(459, 3, True) == "9540" and written(1245, 3, False) == "1245"


def test_demonstrations_are_careless_at_the_stated_rate():
  rng = np.random.default_rng(0)
  problems = sample_problems(4000, rng, digits=3)
  assert len(set(problems)) == 4000
  demos = demonstrations(problems, rng, digits=3, forget_prob=0.6)
  right = np.array([d["response"] == written(a + b, 3, True) for d, (a, b) in zip(demos, problems)])
  carry = np.array([has_carry(a, b, 3) for a, b in problems])
  assert right[~carry].all()  # nothing to forget
  assert abs(right[carry].mean() - 0.4) < 0.04
  wrong = [(d, a, b) for d, (a, b), r in zip(demos, problems, right) if not r]
  assert all(d["response"] == written(carry_dropped_sum(a, b, 3), 3, True) for d, a, b in wrong)
  with pytest.raises(ValueError, match="forget_prob"):
    demonstrations(problems, rng, digits=3, forget_prob=1.5)


def test_exact_match_reward():
  rows = prompt_rows([(456, 789), (1, 2)], digits=3)
  answers = [r["answer"] for r in rows]
  assert answers == ["5421", "3000"]
  got = exact_match_reward(None, ["5421", "300"], answer=answers)
  np.testing.assert_array_equal(got, np.array([1.0, 0.0], np.float32))
  assert got.dtype == np.float32
  with pytest.raises(ValueError, match="answer"):
    exact_match_reward(None, ["1"], answer=["1", "2"])


@pytest.mark.slow
def test_grpo_lifts_greedy_accuracy_by_30_points():
  """The README's main job as a user runs it: `python experiments/addition/main.py` (the full
  default run) in a fresh process on one CPU device with XLA's default optimisation (the tests'
  -O0 flag would double this execution-bound run's time), read from its last line."""
  root = Path(__file__).resolve().parents[1]
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith(("--xla_backend_optimization_level",
                                "--xla_force_host_platform_device_count"))]
  env = {**os.environ, "XLA_FLAGS": " ".join(flags)}
  out = subprocess.run([sys.executable, str(root / "experiments/addition/main.py")], env=env,
                       cwd=root, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  last = out.stdout.strip().splitlines()[-1]
  found = re.match(r"accuracy before RL ([\d.]+)%  →  after RL ([\d.]+)%", last)
  assert found, last
  before, after = (float(v) / 100 for v in found.groups())
  assert 0.2 < before < 0.6  # SFT imitates the careless demonstrator
  assert after - before >= 0.30


def test_preference_pairs_come_from_mixed_prompts():
  samples = [
    ("a", ["5421", "5311", "5421", "9999", "5311"], "5421"),  # mixed: two distinct wrong answers
    ("b", ["3000", "3000"], "3000"),                           # all right: no pair
    ("c", ["1", "2"], "3000"),                                 # all wrong: no pair
  ]
  rows = preference_pairs(samples, max_pairs=5)
  assert rows == [{"prompt": "a", "chosen": "5421", "rejected": "5311"},
                  {"prompt": "a", "chosen": "5421", "rejected": "9999"}]
  assert len(preference_pairs(samples, max_pairs=1)) == 1
  repeated = preference_pairs(samples, max_pairs=5, distinct=False)  # the DPO recipe's pairs
  assert [r["rejected"] for r in repeated] == ["5311", "9999", "5311"]
  for r in rows:
    ok = exact_match_reward(None, [r["chosen"], r["rejected"]], answer=["5421"] * 2)
    np.testing.assert_array_equal(ok, [1.0, 0.0])
