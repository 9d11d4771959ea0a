"""Tools: Python callables with JSON-schema signatures, run in a worker pool with a per-call time
limit, their results and errors returned as chat `tool` messages.

A tool is a function with type hints and a Google-style docstring (an `Args:` section): the
Hugging Face chat-template convention. `transformers.utils.get_json_schema(fn)` gives its schema

  {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}

and `ToolRegistry.schemas()` is the `tools=` argument of a chat template
(`ChatTurns.prompt_tokens(messages, tools=registry.schemas())`).

`registry.run(calls)` runs `ToolCall`s concurrently (a pool of `max_workers` daemon threads, each
call limited to `timeout_s` seconds: `rljax.agents._pool`) and gives one `ToolResult` per call,
in order: the message {"role": "tool", "name": name, "content": text} and a status

  "ok"             content = the return value (a string as it is, anything else as JSON)
  "parse_error"    the model's call could not be read (`ToolCall.error`, from a parser); not run
  "unknown_tool"   no tool has the call's name; not run
  "bad_arguments"  not checked against the schema: an unknown or a missing required argument,
                   or a value of the wrong JSON type / not in its enum (arrays: their items'
                   type too; deeper structure is the tool's to check); not run
  "error"          the tool raised: content "Error: <tool> raised <type>: <message>"
  "timeout"        the call ran past `timeout_s` (its late result is dropped)

A tool's failure is never an exception of the run: it is the model's observation.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rljax.agents._pool import WorkerPool, check_timeout, run_limited

# "over_limit": a call past `ToolEnvironment.max_tool_calls`, not run.
STATUSES = ("ok", "parse_error", "unknown_tool", "bad_arguments", "error", "timeout", "over_limit")


@dataclass(frozen=True)
class ToolCall:
  """A tool call read from a policy turn: `name` and JSON `arguments`, or the parse `error`."""
  name: str = ""
  arguments: Mapping[str, Any] = field(default_factory=dict)
  error: str | None = None


@dataclass(frozen=True)
class ToolResult:
  """A call's `message` ({"role": "tool", "name", "content"}) and `status` (see STATUSES)."""
  message: dict
  status: str

  @property
  def ok(self) -> bool:
    return self.status == "ok"


def tool_message(name: str, content: str) -> dict:
  return {"role": "tool", "name": name, "content": content}


def format_result(value: Any) -> str:
  """A tool's return value as message text: a string as it is, anything else as JSON."""
  if isinstance(value, str):
    return value
  return json.dumps(value, ensure_ascii=False, default=str)


_JSON_TYPES = {
  "string": lambda v: isinstance(v, str),
  "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
  "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
  "boolean": lambda v: isinstance(v, bool),
  "array": lambda v: isinstance(v, list),
  "object": lambda v: isinstance(v, dict),
  "null": lambda v: v is None,
}


def _check_value(value: Any, schema: Mapping[str, Any], where: str) -> str | None:
  """Why `value` does not fit `schema` (its type / nullable / enum, arrays' item types), or None."""
  if value is None and schema.get("nullable"):
    return None
  kinds = schema.get("type")
  kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
  known = [k for k in kinds if k in _JSON_TYPES]
  if known and not any(_JSON_TYPES[k](value) for k in known):
    return f"`{where}` must be of type {' or '.join(known)}; got {json.dumps(value, default=str)}"
  if "enum" in schema and value not in schema["enum"]:
    return (f"`{where}` must be one of {json.dumps(schema['enum'])}; got "
            f"{json.dumps(value, default=str)}")
  if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
    for i, item in enumerate(value):
      why = _check_value(item, schema["items"], f"{where}[{i}]")
      if why:
        return why
  return None


def check_arguments(arguments: Any, parameters: Mapping[str, Any]) -> str | None:
  """Why `arguments` do not fit the `parameters` JSON schema (an object's), or None."""
  if not isinstance(arguments, Mapping):
    return f"the arguments must be a JSON object; got {json.dumps(arguments, default=str)}"
  properties = parameters.get("properties", {}) or {}
  unknown = [k for k in arguments if k not in properties]
  if unknown:
    return (f"unknown argument {unknown[0]!r} (the arguments are: "
            f"{', '.join(properties) or 'none'})")
  missing = [k for k in parameters.get("required", []) or [] if k not in arguments]
  if missing:
    return f"missing required argument {missing[0]!r}"
  for k, v in arguments.items():
    why = _check_value(v, properties[k], k)
    if why:
      return why
  return None


class ToolRegistry:
  """Named tools with their schemas; `run` executes calls (see the module docstring).

  tools: callables to register (each by its `__name__`; their docstrings give the schemas).
  timeout_s: the per-call time limit in seconds (None: no limit).
  max_workers: the threads of the pool.
  """

  def __init__(self, tools: Sequence[Callable[..., Any]] = (), *, timeout_s: float | None = 10.0,
               max_workers: int = 8):
    self.timeout_s = check_timeout(timeout_s)
    self._pool = WorkerPool(max_workers, "rljax-tools")
    self._tools: dict[str, tuple[Callable[..., Any], dict]] = {}
    for fn in tools:
      self.register(fn)

  def register(self, fn: Callable[..., Any], *, name: str | None = None,
               schema: Mapping[str, Any] | None = None) -> Callable[..., Any]:
    """Adds `fn` under `name` (default: its schema's name), with `schema` (default:
    `get_json_schema(fn)`); returns `fn`, so it also works as a decorator."""
    if not callable(fn):
      raise ValueError(f"`fn` must be callable; got {type(fn).__name__}.")
    if schema is None:
      from transformers.utils import get_json_schema
      try:
        schema = get_json_schema(fn)
      except Exception as e:
        raise ValueError(
          f"`fn` ({getattr(fn, '__name__', fn)!r}) needs type hints and a Google-style "
          f"docstring with an `Args:` section for its JSON schema, or pass `schema=`: {e}") from e
    schema = json.loads(json.dumps(schema))  # a private copy
    function = schema.get("function") if isinstance(schema, dict) else None
    if schema.get("type") != "function" or not isinstance(function, dict):
      raise ValueError(f"`schema` must be {{'type': 'function', 'function': {{...}}}}; got "
                       f"{schema!r}.")
    name = function.get("name") if name is None else name
    if not isinstance(name, str) or not name:
      raise ValueError(f"`name` must be a non-empty string; got {name!r}.")
    if name in self._tools:
      raise ValueError(f"`name` {name!r} is already registered.")
    function["name"] = name
    function.setdefault("parameters", {"type": "object", "properties": {}})
    self._tools[name] = (fn, schema)
    return fn

  @property
  def names(self) -> list[str]:
    return list(self._tools)

  def schemas(self) -> list[dict]:
    """The tools' JSON schemas, in registration order (a chat template's `tools=`)."""
    return [json.loads(json.dumps(schema)) for _, schema in self._tools.values()]

  def _refusal(self, call: ToolCall) -> ToolResult | None:
    """The result of a call that is not run (parse error, unknown tool, bad arguments)."""
    if call.error is not None:
      return ToolResult(tool_message(call.name or "unparsed", f"Error: {call.error}"),
                        "parse_error")
    if call.name not in self._tools:
      return ToolResult(tool_message(call.name, f"Error: unknown tool {call.name!r}; the tools "
                                                f"are: {', '.join(self._tools) or 'none'}."),
                        "unknown_tool")
    why = check_arguments(call.arguments, self._tools[call.name][1]["function"]["parameters"])
    if why:
      return ToolResult(tool_message(call.name, f"Error: bad arguments for {call.name}: {why}."),
                        "bad_arguments")
    return None

  def run(self, calls: Sequence[ToolCall]) -> list[ToolResult]:
    """One `ToolResult` per call, in order; the calls that pass the checks run concurrently."""
    results: list[ToolResult | None] = [self._refusal(c) for c in calls]
    todo = [i for i, r in enumerate(results) if r is None]

    def job(call: ToolCall):
      fn = self._tools[call.name][0]
      return lambda: fn(**dict(call.arguments))

    outcomes = run_limited(self._pool, [job(calls[i]) for i in todo], self.timeout_s)
    for i, outcome in zip(todo, outcomes):
      name = calls[i].name
      if outcome.timed_out:
        results[i] = ToolResult(tool_message(
          name, f"Error: {name} did not finish within {self.timeout_s:g} s."), "timeout")
      elif outcome.error is not None:
        e = outcome.error
        results[i] = ToolResult(tool_message(
          name, f"Error: {name} raised {type(e).__name__}: {e}"), "error")
      else:
        try:
          text = format_result(outcome.value)
        except Exception as e:  # noqa: BLE001 — an unprintable value is the tool's error
          results[i] = ToolResult(tool_message(
            name, f"Error: {name} returned a value that cannot be shown: {e}"), "error")
        else:
          results[i] = ToolResult(tool_message(name, text), "ok")
    return results  # type: ignore[return-value]


def tool_metrics(results: Sequence[ToolResult]) -> dict[str, float]:
  """{"tool_calls": all, "tool_errors": not ok, "tool_timeouts", "tool_parse_errors"} counts."""
  return {"tool_calls": float(len(results)),
          "tool_errors": float(sum(not r.ok for r in results)),
          "tool_timeouts": float(sum(r.status == "timeout" for r in results)),
          "tool_parse_errors": float(sum(r.status == "parse_error" for r in results))}


# -- the calculator --------------------------------------------------------------------------

CALCULATOR_MAX_CHARS = 500
CALCULATOR_MAX_DIGITS = 1000  # bound on integer results (and so on the work of ** and *)

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _digits(x: int | float) -> float:
  return math.log10(abs(x)) + 1 if x else 1.0


def _evaluate(node: ast.AST) -> int | float:
  if isinstance(node, ast.Expression):
    return _evaluate(node.body)
  if isinstance(node, ast.Constant):
    if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
      raise ValueError(f"only numbers are allowed; got {node.value!r}")
    return node.value
  if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
    return _UNARY[type(node.op)](_evaluate(node.operand))
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    left, right = _evaluate(node.left), _evaluate(node.right)
    if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int):
      if right > 0 and abs(left) > 1 and right * math.log10(abs(left)) > CALCULATOR_MAX_DIGITS:
        raise ValueError(f"the result would have more than {CALCULATOR_MAX_DIGITS} digits")
    if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
      if _digits(left) + _digits(right) > CALCULATOR_MAX_DIGITS + 1:
        raise ValueError(f"the result would have more than {CALCULATOR_MAX_DIGITS} digits")
    return _BINARY[type(node.op)](left, right)
  raise ValueError(f"unsupported syntax: {ast.unparse(node)}")


def calculator(expression: str) -> str:
  """Evaluates an arithmetic expression: numbers, + - * / // % ** and parentheses.

  Args:
    expression: The arithmetic expression, e.g. "12 * (3 + 4) - 5 / 2".
  """
  if not isinstance(expression, str):
    raise ValueError("the expression must be a string")
  if len(expression) > CALCULATOR_MAX_CHARS:
    raise ValueError(f"the expression is longer than {CALCULATOR_MAX_CHARS} characters")
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except SyntaxError as e:
    raise ValueError(f"not an arithmetic expression: {expression!r}") from e
  value = _evaluate(tree)
  if isinstance(value, complex):  # (-8) ** 0.5
    raise ValueError("the result is not a real number")
  return str(value) if isinstance(value, int) else repr(float(value))
