"""The calculator example: its pieces, and a short run in which multi-turn GRPO raises both the
tool-use rate and the greedy accuracy of the SFT policy (one fixed seed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.calculator.task import (  # noqa: E402
  calculator_environment,
  calculator_tokenizer,
  demonstration,
  exact_answer,
  problem_rows,
  sample_problems,
  tool_call_text,
)
from rljax.agents import ChatTurns, parser_for  # noqa: E402
from rljax.agents.rollout import action_text  # noqa: E402

TOKENIZER = calculator_tokenizer()
CHAT = ChatTurns(TOKENIZER)
EOS = TOKENIZER.eos_token_id


def test_a_demonstration_is_the_conversation_the_template_renders():
  row = problem_rows([(347, 29)])[0]
  ids, mask = demonstration(CHAT, row, use_tool=True)
  call = tool_call_text("347*29")
  conversation = [{"role": "user", "content": "347*29"}, {"role": "assistant", "content": call},
                  {"role": "tool", "name": "calculator", "content": "10063"},
                  {"role": "assistant", "content": "10063"}]
  rendered = TOKENIZER.apply_chat_template(conversation, tokenize=False)
  assert TOKENIZER.decode(ids) + "\n" == rendered  # the last turn ends at its stop token
  policy = [TOKENIZER.decode([i]) for i, m in zip(ids, mask) if m]
  assert "".join(policy) == call + "<|im_end|>" + "10063" + "<|im_end|>"
  direct, direct_mask = demonstration(CHAT, row, use_tool=False)
  assert TOKENIZER.decode(np.asarray(direct)[direct_mask].tolist()) == "10063<|im_end|>"


def test_the_environment_runs_the_call_and_scores_the_answer():
  env = calculator_environment()
  row = problem_rows([(347, 29)])[0]
  _, (state,) = env.reset([row], seed=0)
  call = TOKENIZER(tool_call_text("347*29"), add_special_tokens=False)["input_ids"] + [EOS]
  text = action_text(TOKENIZER, np.asarray(call), {EOS})
  assert parser_for("qwen").parse(text).calls[0].arguments == {"expression": "347*29"}
  step = env.step([text], [call], [state])
  assert not step.done[0] and step.observations[0].messages[0]["content"] == "10063"
  answer = env.step(["10063"], [[0]], step.states)
  assert answer.done[0] and answer.rewards[0] == 1.0
  assert exact_answer(" 10064 ", row) == 0.0
  problems = sample_problems(50, np.random.default_rng(0))
  assert len(set(problems)) == 50 and all(100 <= a < 1000 and 10 <= b < 100 for a, b in problems)


@pytest.mark.slow
def test_grpo_raises_tool_use_and_accuracy():
  """`python experiments/calculator/main.py` shortened (200 SFT, 8 GRPO steps, 64 evaluation
  problems), in a fresh process on one CPU device, read from its last line."""
  root = Path(__file__).resolve().parents[1]
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith(("--xla_backend_optimization_level",
                                "--xla_force_host_platform_device_count"))]
  env = {**os.environ, "XLA_FLAGS": " ".join(flags)}
  out = subprocess.run([sys.executable, str(root / "experiments/calculator/main.py"), "--set",
                        "sft_steps=200", "rl_steps=8", "num_eval=64"], env=env, cwd=root,
                       capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  last = out.stdout.strip().splitlines()[-1]
  found = re.match(r"accuracy ([\d.]+)% → ([\d.]+)%, tool use ([\d.]+)% → ([\d.]+)%", last)
  assert found, last
  acc_before, acc_after, tool_before, tool_after = (float(v) / 100 for v in found.groups())
  assert tool_before < 0.5 and tool_after - tool_before >= 0.3
  assert acc_after - acc_before >= 0.3
