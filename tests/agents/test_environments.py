"""The environment protocol: observations and steps, RowEnvironment, safe_step (errors and
timeouts become observations and metrics), determinism given a seed, and ToolEnvironment."""

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from rljax.agents import (
  ChatTurns,
  Environment,
  EnvStep,
  Observation,
  RowEnvironment,
  RowStep,
  ToolEnvironment,
  ToolRegistry,
  calculator,
  safe_step,
)
from rljax.rewards import math_answer_reward
from tiny_tokenizer import tiny_qwen_tokenizer

RELEASE = threading.Event()


@dataclass(frozen=True)
class Guess:
  secret: int
  guesses: int = 0


class GuessNumber(RowEnvironment):
  """Higher / lower feedback on a secret drawn from the row's generator. Actions "boom" raise and
  "hang" block (until RELEASE), to test safe_step."""

  def reset_row(self, example, rng):
    secret = int(rng.integers(0, example["high"]))
    return [{"role": "user", "content": f"Guess a number below {example['high']}."}], Guess(secret)

  def step_row(self, action, action_tokens, state):
    if action == "boom":
      raise RuntimeError("the environment broke")
    if action == "hang":
      RELEASE.wait(30)
    guess, state = int(action), Guess(state.secret, state.guesses + 1)
    if guess == state.secret:
      return RowStep(Observation(), 1.0, True, state, {"solved": 1.0})
    hint = "higher" if guess < state.secret else "lower"
    return RowStep(Observation(({"role": "user", "content": hint},)), 0.0, False, state,
                   {"solved": 0.0})


def test_observation_validation():
  assert Observation([{"role": "tool", "content": "4"}]).messages == (
    {"role": "tool", "content": "4"},)
  assert Observation(tokens=[1, np.int32(2)]).tokens == (1, 2)
  with pytest.raises(ValueError, match="either `messages` or `tokens`"):
    Observation(({"role": "user", "content": "a"},), tokens=(1,))
  with pytest.raises(ValueError, match="role"):
    Observation(({"role": "assistant", "content": "a"},))
  with pytest.raises(ValueError, match="content"):
    Observation(({"role": "user", "content": None},))
  with pytest.raises(ValueError, match="non-negative ints"):
    Observation(tokens=(1, -2))
  with pytest.raises(ValueError, match="sequence of chat messages"):
    Observation({"role": "user", "content": "a"})


def test_env_step_validation():
  step = EnvStep([Observation()] * 2, [1, 0], [True, False], [None, None], {"x": 1})
  assert step.rewards.dtype == np.float32 and step.done.dtype == bool
  with pytest.raises(ValueError, match="`rewards` has 1 rows"):
    EnvStep([Observation()] * 2, [1], [True, False], [None, None])
  with pytest.raises(ValueError, match="booleans"):
    EnvStep([Observation()], [1], [1], [None])


def test_reset_is_deterministic_given_the_seed():
  env, examples = GuessNumber(), [{"high": 1000}] * 16
  assert isinstance(env, Environment)
  secrets = lambda seed: [s.secret for s in env.reset(examples, seed=seed)[1]]  # noqa: E731
  assert secrets(3) == secrets(3)
  assert secrets(3) != secrets(4)
  assert len(set(secrets(3))) > 1  # rows differ
  expected = [int(np.random.default_rng([3, i]).integers(0, 1000)) for i in range(16)]
  assert secrets(3) == expected
  with pytest.raises(ValueError, match="seed"):
    env.reset(examples, seed=-1)


def play(env, examples, seed):
  """Bisection over a few rounds; the trajectory of every row."""
  _, states = env.reset(examples, seed=seed)
  low, high = [0] * len(states), [e["high"] for e in examples]
  log, live = [], list(range(len(states)))
  for _ in range(12):
    guesses = [(low[i] + high[i]) // 2 for i in live]
    step = safe_step(env, [str(g) for g in guesses], [[g] for g in guesses],
                     [states[i] for i in live], timeout_s=5.0)
    log.append((guesses, step.rewards.tolist(), step.done.tolist()))
    for i, g, o, d, s in zip(live, guesses, step.observations, step.done, step.states):
      states[i] = s
      if d:
        continue
      if o.messages[0]["content"] == "higher":
        low[i] = g + 1
      else:
        high[i] = g
    live = [i for i, d in zip(live, step.done) if not d]
    if not live:
      break
  return log, [s.guesses for s in states]


def test_trajectories_are_deterministic_given_the_seed():
  examples = [{"high": 100}] * 6
  first = play(GuessNumber(), examples, seed=7)
  assert first == play(GuessNumber(), examples, seed=7)
  assert first != play(GuessNumber(), examples, seed=8)
  assert all(1 <= g <= 8 for g in first[1])  # bisection of 100 numbers


def test_row_environment_step_raises_and_safe_step_does_not():
  env = GuessNumber()
  _, states = env.reset([{"high": 10}] * 4, seed=0)
  secret = states[0].secret
  with pytest.raises(RuntimeError, match="broke"):
    env.step([str(secret), "boom", "1", "2"], [[]] * 4, states)
  start = time.monotonic()
  step = safe_step(env, [str(secret), "boom", "hang", str((secret + 1) % 10)], [[]] * 4, states,
                   timeout_s=0.3)
  elapsed = time.monotonic() - start
  RELEASE.set()
  assert elapsed < 2.0
  assert step.done.tolist() == [True, True, True, False]
  assert step.rewards.tolist() == [1.0, 0.0, 0.0, 0.0]
  assert step.observations[1].messages == (
    {"role": "user", "content": "Environment error: RuntimeError: the environment broke"},)
  assert step.observations[2].messages[0]["content"] == (
    "Environment error: the step did not finish within 0.3 s.")
  assert step.states[1] is states[1] and step.states[2] is states[2]  # failed rows keep theirs
  assert step.states[0].guesses == 1
  assert step.metrics == {"env_errors": 1.0, "env_timeouts": 1.0, "solved": 1.0}
  kept = safe_step(env, ["boom"], [[]], states[:1], timeout_s=1.0, done_on_error=False,
                   error_role="tool")
  assert kept.done.tolist() == [False] and kept.observations[0].messages[0]["role"] == "tool"
  RELEASE.clear()


class Batched:
  """A batched Environment (not per-row): fails as a whole."""

  def __init__(self, mode):
    self.mode = mode

  def reset(self, examples, *, seed):
    return [[{"role": "user", "content": "go"}] for _ in examples], [0] * len(examples)

  def step(self, actions, action_tokens, states):
    if self.mode == "raise":
      raise KeyError("missing")
    if self.mode == "hang":
      RELEASE.wait(30)
    rows = len(actions) - (self.mode == "short")
    return EnvStep([Observation()] * rows, [0.5] * rows, [True] * rows, [1] * rows,
                   {"steps": 1.0})


@pytest.mark.parametrize("mode,errors,timeouts,text", [
  ("ok", 0, 0, None), ("raise", 3, 0, "KeyError: 'missing'"), ("hang", 0, 3, "within 0.2 s"),
  ("short", 3, 0, "step returned 2 rows for 3 given"),
])
def test_safe_step_on_a_batched_environment(mode, errors, timeouts, text):
  step = safe_step(Batched(mode), ["a", "b", "c"], [[1], [2], [3]], [0, 0, 0], timeout_s=0.2)
  assert step.metrics["env_errors"] == errors and step.metrics["env_timeouts"] == timeouts
  if text is None:
    assert step.rewards.tolist() == [0.5] * 3 and step.states == [1, 1, 1]
    assert step.metrics["steps"] == 1.0
  else:
    assert step.rewards.tolist() == [0.0] * 3 and step.done.all() and step.states == [0, 0, 0]
    assert all(text in o.messages[0]["content"] for o in step.observations)
  RELEASE.set()
  RELEASE.clear()


def test_safe_step_checks_its_arguments():
  with pytest.raises(ValueError, match="`actions` has 1 rows but `states` has 2"):
    safe_step(GuessNumber(), ["1"], [[1], [2]], [None, None], timeout_s=1.0)
  with pytest.raises(ValueError, match="timeout_s"):
    safe_step(GuessNumber(), [], [], [], timeout_s=-1)


# -- ToolEnvironment ---------------------------------------------------------------------------

def arithmetic_env(max_tool_calls=2):
  def prompt(example):
    return [{"role": "user", "content": f"What is {example['question']}?"}]

  def reward(text, example):
    return float(math_answer_reward(None, [text], answer=[example["answer"]])[0])

  return ToolEnvironment(prompt, reward, ToolRegistry([calculator], timeout_s=1.0),
                         "qwen2.5", max_tool_calls=max_tool_calls)


CALL = '<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{}"}}}}\n</tool_call>'


def test_tool_environment_turns():
  env = arithmetic_env()
  examples = [{"question": "123 * 456", "answer": "56088"}] * 5
  messages, states = env.reset(examples, seed=0)
  assert messages[0] == [{"role": "user", "content": "What is 123 * 456?"}]
  actions = [CALL.format("123 * 456"),                      # a call
             "The answer is 56088.",                         # an answer, right
             "The answer is 56000.",                         # an answer, wrong
             "<tool_call>{\"name\": \"calculator\", </tool_call>",  # malformed
             CALL.format("1 + 1") + CALL.format("2 + 2") + CALL.format("3 + 3")]  # over the limit
  step = safe_step(env, actions, [[]] * 5, states, timeout_s=5.0)
  assert step.done.tolist() == [False, True, True, False, False]
  assert step.rewards.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
  assert step.observations[0].messages == ({"role": "tool", "name": "calculator",
                                            "content": "56088"},)
  assert step.observations[1] == Observation()
  assert "as JSON" in step.observations[3].messages[0]["content"]
  assert [m["content"] for m in step.observations[4].messages][:2] == ["2", "4"]
  assert "at most 2 tool calls per turn" in step.observations[4].messages[2]["content"]
  assert [s.tool_calls for s in step.states] == [1, 0, 0, 1, 2]
  assert all(s.turns == 1 for s in step.states)
  assert step.metrics == {"tool_calls": 5.0, "tool_errors": 2.0, "tool_timeouts": 0.0,
                          "tool_parse_errors": 1.0, "final_answers": 2.0,
                          "env_errors": 0.0, "env_timeouts": 0.0}
  # The observation's ids: the tool result inside the template's tool-response turn.
  qwen = tiny_qwen_tokenizer()
  ids = ChatTurns(qwen).observation_tokens(step.observations[0])
  assert qwen.decode(ids) == ("<|im_start|>user\n<tool_response>\n56088\n</tool_response>"
                              "<|im_end|>\n<|im_start|>assistant\n")
  assert env.tool_schemas == env.tools.schemas()


def test_tool_environment_reward_errors_are_environment_errors():
  env = ToolEnvironment(lambda ex: [{"role": "user", "content": "q"}],
                        lambda text, ex: 1 / 0, ToolRegistry([calculator]))
  _, states = env.reset([None], seed=0)
  step = safe_step(env, ["no call"], [[]], states, timeout_s=5.0)
  assert step.metrics["env_errors"] == 1.0 and step.done.tolist() == [True]
  with pytest.raises(ValueError, match="max_tool_calls"):
    ToolEnvironment(lambda ex: [], lambda t, ex: 0.0, ToolRegistry(), max_tool_calls=0)
