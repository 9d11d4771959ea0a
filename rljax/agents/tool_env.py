"""A tool-using task as an environment: the policy calls tools until it answers.

`ToolEnvironment(prompt, reward, tools, parser)` wraps a task — `prompt(example)` gives a row's
initial chat messages, `reward(text, example) -> float` verifies a final answer — a
`ToolRegistry` and a tool-call parser. Each policy turn is parsed:

  tool calls   the first `max_tool_calls` run (`ToolRegistry.run`); the observation is their
               tool messages, in order (results and errors alike; a call past the limit gets
               an error message, status "over_limit", and is not run); reward 0, not done
  none         done: the turn is the answer, its reward reward(text, example); the observation
               is empty

Metrics (sums over the rows): tool_calls, tool_errors, tool_timeouts, tool_parse_errors (see
`rljax.agents.tools.tool_metrics`) and final_answers (the rows that answered). A `reward` or
`prompt` that raises is an environment error (`safe_step`). Render the first prompt with the
tools' schemas: `ChatTurns.prompt_tokens(messages, tools=env.tool_schemas)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from rljax.agents.environment import Observation, RowEnvironment, RowStep
from rljax.agents.parsers import ToolParser, parser_for
from rljax.agents.tools import ToolRegistry, ToolResult, tool_message, tool_metrics


@dataclass(frozen=True)
class ToolState:
  """A row's state: its example, the policy turns so far and the tool calls run so far."""
  example: Any
  turns: int = 0
  tool_calls: int = 0


class ToolEnvironment(RowEnvironment):
  """A task with tools (see the module docstring).

  prompt: example -> the row's initial chat messages.
  reward: (final answer text, example) -> float.
  tools: the registry the calls run in.
  parser: a parser or a model family for `parser_for` (default "qwen": Hermes <tool_call>).
  max_tool_calls: the most calls run per turn.
  """

  def __init__(self, prompt: Callable[[Any], Sequence[dict]], reward: Callable[[str, Any], float],
               tools: ToolRegistry, parser: ToolParser | str = "qwen", *, max_tool_calls: int = 4):
    if not callable(prompt) or not callable(reward):
      raise ValueError("`prompt` and `reward` must be callables: example -> messages and "
                       "(text, example) -> float.")
    if not isinstance(tools, ToolRegistry):
      raise ValueError(f"`tools` must be a ToolRegistry; got {type(tools).__name__}.")
    if (isinstance(max_tool_calls, bool) or not isinstance(max_tool_calls, int)
        or max_tool_calls < 1):
      raise ValueError(f"`max_tool_calls` must be an int >= 1; got {max_tool_calls!r}.")
    self.prompt, self.reward, self.tools = prompt, reward, tools
    self.parser = parser_for(parser) if isinstance(parser, str) else parser
    if not callable(getattr(self.parser, "parse", None)):
      raise ValueError(f"`parser` must have a `parse(text)` method; got "
                       f"{type(self.parser).__name__}.")
    self.max_tool_calls = max_tool_calls

  @property
  def tool_schemas(self) -> list[dict]:
    """The tools' JSON schemas: the chat template's `tools=` for the first prompt."""
    return self.tools.schemas()

  def reset_row(self, example: Any, rng: np.random.Generator) -> tuple[list[dict], ToolState]:
    return list(self.prompt(example)), ToolState(example)

  def step_row(self, action: str, action_tokens: Sequence[int], state: ToolState) -> RowStep:
    calls = self.parser.parse(action).calls
    if not calls:
      reward = float(self.reward(action, state.example))
      if not math.isfinite(reward):
        raise ValueError(f"`reward` returned {reward}; a reward must be finite.")
      return RowStep(Observation(), reward, True, replace(state, turns=state.turns + 1),
                     {"final_answers": 1.0})
    run, over = calls[:self.max_tool_calls], calls[self.max_tool_calls:]
    results = self.tools.run(run) + [
      ToolResult(tool_message(c.name or "unparsed", f"Error: at most {self.max_tool_calls} tool "
                                                    "calls per turn; this one was not run."),
                 "over_limit") for c in over]
    return RowStep(Observation(tuple(r.message for r in results)), 0.0, False,
                   replace(state, turns=state.turns + 1, tool_calls=state.tool_calls + len(run)),
                   tool_metrics(results))
