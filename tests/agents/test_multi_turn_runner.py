"""Multi-turn GRPO through `rljax train`: an experiment's `build_environment` hook, the
`grpo.multi_turn` section and the top-level `stop_strings` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

from rljax.cli import main

HERE = Path(__file__).resolve().parents[1] / "experiment"

EXPERIMENT = '''
import dataclasses, sys
sys.path.insert(0, {here!r})
from tiny_experiment import grpo_config
from rljax.agents import Observation, RowEnvironment, RowStep
from rljax.agents.rollout import MultiTurnConfig
from rljax.rollout.engine import EngineConfig


class Echo(RowEnvironment):
  """Two turns: the first answered with "what is 5 ?", the second scored by its "5"s."""

  def reset_row(self, example, rng):
    return [{{"role": "user", "content": example["prompt"]}}], 0

  def step_row(self, action, action_tokens, turn):
    words = action.split()
    return RowStep(Observation(messages=({{"role": "user", "content": "what is 5 ?"}},)),
                   reward=float(turn) * words.count("5") / max(len(words), 1), done=turn >= 1,
                   state=turn + 1)


def build_environment(config, tokenizer):
  return Echo()


base = grpo_config({out!r})
config = dataclasses.replace(
  base, reward=None, data=dataclasses.replace(base.data, chat={chat}, buckets=None),
  grpo=dataclasses.replace(base.grpo, engine=EngineConfig(num_slots=8, block_size=4),
                           multi_turn=MultiTurnConfig(max_turns=2, turn_tokens=4,
                                                      prompt_length=16),
                           sampling=dataclasses.replace(base.grpo.sampling, max_new_tokens=24)),
  eval_k=1)
'''


def _experiment(tmp_path, chat="False"):
  out = tmp_path / "run"
  path = tmp_path / "multi_turn_exp.py"
  path.write_text(EXPERIMENT.format(here=str(HERE), out=str(out), chat=chat))
  return path, out


def test_multi_turn_grpo_through_the_cli(tmp_path, capsys):
  path, out = _experiment(tmp_path)
  assert main(["train", str(path), "--set", "steps=1", "--set", 'stop_strings=["world"]',
               "--out", str(out)]) == 0
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1]
  last = records[-1]
  assert last["turns_mean"] > 1 and "truncated_rate" in last and "env/env_errors" in last
  assert "eval/accuracy" in last and "eval/turns_mean" in last
  assert json.loads((out / "config.json").read_text())["stop_strings"] == ["world"]
  capsys.readouterr()


def test_a_chat_rendering_dataset_is_refused(tmp_path, capsys):
  path, out = _experiment(tmp_path, chat="True")
  assert main(["train", str(path), "--out", str(out)]) == 2
  assert "data.chat=False" in capsys.readouterr().err
