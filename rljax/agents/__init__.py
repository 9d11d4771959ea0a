"""Agents: multi-turn environments and tool calls, the host side of agentic rollouts.

  environment   the batched `Environment` protocol, `RowEnvironment`, `safe_step`
  observations  `ChatTurns`: observation ids as the chat template's delta, end-of-turn ids
  tools         `ToolRegistry` (JSON-schema tools in a worker pool), the `calculator` tool
  parsers       tool-call parsers per model family (`HermesToolParser`, `parser_for`)
  tool_env      `ToolEnvironment`: a task whose policy calls tools until it answers
  rollout       `multi_turn_rollout` on the rollout engine (`MultiTurnConfig`, `Trajectories`)
"""

from rljax.agents.environment import (
  OBSERVATION_ROLES,
  EnvStep,
  Environment,
  Observation,
  RowEnvironment,
  RowStep,
  error_observation,
  safe_step,
)
from rljax.agents.observations import (
  LENGTH,
  STOP_REASONS,
  STOP_STRING,
  STOP_TOKEN,
  ChatTurns,
)
from rljax.agents.parsers import (
  HermesToolParser,
  ParsedTurn,
  ToolParser,
  parser_for,
  register_parser,
)
from rljax.agents.rollout import MultiTurnConfig, Trajectories, action_text, multi_turn_rollout
from rljax.agents.tool_env import ToolEnvironment, ToolState
from rljax.agents.tools import (
  STATUSES,
  ToolCall,
  ToolRegistry,
  ToolResult,
  calculator,
  check_arguments,
  tool_message,
  tool_metrics,
)

__all__ = [
  "LENGTH",
  "OBSERVATION_ROLES",
  "STATUSES",
  "STOP_REASONS",
  "STOP_STRING",
  "STOP_TOKEN",
  "ChatTurns",
  "EnvStep",
  "Environment",
  "HermesToolParser",
  "MultiTurnConfig",
  "Observation",
  "ParsedTurn",
  "RowEnvironment",
  "RowStep",
  "ToolCall",
  "ToolEnvironment",
  "ToolParser",
  "ToolRegistry",
  "ToolResult",
  "ToolState",
  "Trajectories",
  "action_text",
  "calculator",
  "check_arguments",
  "error_observation",
  "multi_turn_rollout",
  "parser_for",
  "register_parser",
  "safe_step",
  "tool_message",
  "tool_metrics",
]
