"""The tool registry (schemas, checks, errors and timeouts as tool messages), the calculator and
the Hermes / Qwen tool-call parser."""

import threading
import time
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers.utils import get_json_schema

from rljax.agents import (
  HermesToolParser,
  ToolCall,
  ToolRegistry,
  calculator,
  check_arguments,
  parser_for,
  register_parser,
  tool_metrics,
)


def scale(values: list[int], factor: float = 1.0, mode: Literal["up", "down"] = "up"
          ) -> list[float]:
  """Scales numbers.

  Args:
    values: The numbers.
    factor: The factor.
    mode: Which way.
  """
  return [v * factor if mode == "up" else v / factor for v in values]


def failing(x: int) -> str:
  """Always fails.

  Args:
    x: Anything.
  """
  raise RuntimeError(f"broken on {x}")


RELEASE = threading.Event()


def hanging(seconds: float) -> str:
  """Sleeps.

  Args:
    seconds: How long.
  """
  RELEASE.wait(seconds)
  return "late"


@pytest.fixture(scope="module")
def registry():
  return ToolRegistry([calculator, scale, failing, hanging], timeout_s=0.2)


# -- the calculator ---------------------------------------------------------------------------

@pytest.mark.parametrize("expression,value", [
  ("2 + 3 * 4", "14"), ("(1 + 2) ** 3", "27"), ("7 / 2", "3.5"), ("-7 // 2", "-4"),
  ("10 % 4", "2"), ("-(3 - 5)", "2"), ("123456789 * 987654321", "121932631112635269"),
  (" 1.5 * 2 ", "3.0"), ("2 ** -1", "0.5"), ("+4", "4"),
])
def test_calculator(expression, value):
  assert calculator(expression) == value


@pytest.mark.parametrize("expression,error", [
  ("__import__('os').system('true')", "unsupported syntax"), ("a + 1", "unsupported syntax"),
  ("'a' * 3", "only numbers"), ("True + 1", "only numbers"), ("2 ** 100000", "digits"),
  ("9" * 600 + " * " + "9" * 600, "longer than"), ("10 ** 999 * 10 ** 999", "digits"),
  ("(-8) ** 0.5", "not a real number"), ("1 +", "not an arithmetic expression"),
  ("[1, 2]", "unsupported syntax"),
])
def test_calculator_refuses(expression, error):
  with pytest.raises(ValueError, match=error):
    calculator(expression)


@given(st.recursive(st.integers(-1000, 1000).map(str),
                    lambda e: st.tuples(e, st.sampled_from(["+", "-", "*"]), e).map(
                      lambda t: f"({t[0]} {t[1]} {t[2]})"), max_leaves=8))
def test_calculator_matches_python_on_integer_arithmetic(expression):
  assert calculator(expression) == str(eval(expression))  # the reference: Python itself


def test_calculator_errors_are_tool_messages(registry):
  (result,) = registry.run([ToolCall("calculator", {"expression": "1 / 0"})])
  assert result.status == "error"
  assert result.message == {"role": "tool", "name": "calculator", "content":
                            "Error: calculator raised ZeroDivisionError: division by zero"}


# -- the registry -----------------------------------------------------------------------------

def test_schemas_are_the_hf_json_schemas(registry):
  assert registry.names == ["calculator", "scale", "failing", "hanging"]
  assert registry.schemas()[1] == get_json_schema(scale)
  registry.schemas()[0]["function"]["name"] = "changed"  # a copy
  assert registry.schemas()[0]["function"]["name"] == "calculator"


def test_register_checks():
  registry = ToolRegistry()
  with pytest.raises(ValueError, match="docstring"):
    registry.register(lambda x: x)
  registry.register(lambda x: x * 2, schema={"type": "function", "function": {
    "name": "double", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}},
                                     "required": ["x"]}}})
  assert registry.run([ToolCall("double", {"x": 4})])[0].message["content"] == "8"
  with pytest.raises(ValueError, match="already registered"):
    registry.register(calculator, name="double")
  with pytest.raises(ValueError, match="timeout_s"):
    ToolRegistry(timeout_s=0)


def test_results_and_refusals_are_tool_messages_in_order(registry):
  calls = [ToolCall("scale", {"values": [1, 2], "factor": 2.5}),
           ToolCall("nope", {}),
           ToolCall("scale", {"factor": 2.0}),
           ToolCall("scale", {"values": [1], "speed": 3}),
           ToolCall("scale", {"values": [1, "2"]}),
           ToolCall("scale", {"values": [1], "factor": True}),
           ToolCall("scale", {"values": [1], "mode": "sideways"}),
           ToolCall("failing", {"x": 3}),
           ToolCall(error="could not parse the tool call 'x' as JSON")]
  results = registry.run(calls)
  assert [r.status for r in results] == ["ok", "unknown_tool", "bad_arguments", "bad_arguments",
                                         "bad_arguments", "bad_arguments", "bad_arguments",
                                         "error", "parse_error"]
  contents = [r.message["content"] for r in results]
  assert contents[0] == "[2.5, 5.0]"
  assert "unknown tool 'nope'" in contents[1] and "calculator, scale" in contents[1]
  assert "missing required argument 'values'" in contents[2]
  assert "unknown argument 'speed'" in contents[3]
  assert "`values[1]` must be of type integer" in contents[4]
  assert "`factor` must be of type number" in contents[5]
  assert '`mode` must be one of ["up", "down"]' in contents[6]
  assert contents[7] == "Error: failing raised RuntimeError: broken on 3"
  assert contents[8] == "Error: could not parse the tool call 'x' as JSON"
  assert all(r.message["role"] == "tool" for r in results)
  assert tool_metrics(results) == {"tool_calls": 9.0, "tool_errors": 8.0, "tool_timeouts": 0.0,
                                   "tool_parse_errors": 1.0}


def test_check_arguments_enum_nullable_and_unions():
  parameters = {"type": "object", "required": ["a"], "properties": {
    "a": {"type": ["integer", "string"]}, "b": {"type": "number", "nullable": True},
    "c": {"type": "string", "enum": ["x", "y"]}}}
  assert check_arguments({"a": 1, "b": None, "c": "x"}, parameters) is None
  assert check_arguments({"a": "1", "b": 2.5}, parameters) is None
  assert "must be one of" in check_arguments({"a": 1, "c": "z"}, parameters)
  assert "type integer or string" in check_arguments({"a": 1.5}, parameters)
  assert "JSON object" in check_arguments([1], parameters)


def test_a_hung_tool_times_out_and_the_others_finish(registry):
  start = time.monotonic()
  results = registry.run([ToolCall("hanging", {"seconds": 30.0}),
                          ToolCall("calculator", {"expression": "6 * 7"})])
  elapsed = time.monotonic() - start
  assert [r.status for r in results] == ["timeout", "ok"]
  assert results[0].message["content"] == "Error: hanging did not finish within 0.2 s."
  assert results[1].message["content"] == "42"
  assert 0.2 <= elapsed < 2.0
  RELEASE.set()  # let the hung worker go
  RELEASE.clear()


def test_calls_run_concurrently_and_a_busy_pool_times_out():
  def nap(seconds: float) -> str:
    """Naps.

    Args:
      seconds: How long.
    """
    time.sleep(seconds)
    return "ok"

  registry = ToolRegistry([nap], timeout_s=2.0, max_workers=4)
  start = time.monotonic()
  assert [r.status for r in registry.run([ToolCall("nap", {"seconds": 0.3})] * 4)] == ["ok"] * 4
  assert time.monotonic() - start < 1.0  # 4 × 0.3 s in parallel, not 1.2 s in sequence
  one = ToolRegistry([hanging], timeout_s=0.2, max_workers=1)
  results = one.run([ToolCall("hanging", {"seconds": 30.0})] * 2)
  assert [r.status for r in results] == ["timeout", "timeout"]  # the 2nd never got a worker
  RELEASE.set()
  RELEASE.clear()


# -- the parser -------------------------------------------------------------------------------

def test_hermes_parses_well_formed_calls():
  text = ('Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": '
          '"6 * 7"}}\n</tool_call>\n<tool_call>{"name": "scale", "arguments": "{\\"values\\": '
          '[1]}"}</tool_call> done')
  parsed = HermesToolParser().parse(text)
  assert parsed.content == "Let me compute.\n\n done"
  assert parsed.calls == [ToolCall("calculator", {"expression": "6 * 7"}),
                          ToolCall("scale", {"values": [1]})]
  assert HermesToolParser().parse("The answer is 42.").calls == []
  assert HermesToolParser().parse('<tool_call>{"name": "f"}</tool_call>').calls == [ToolCall("f")]


@pytest.mark.parametrize("body,error", [
  ('{"name": "calculator", "arguments": {"expression": "1+1"}', "as JSON"),
  ('[1, 2]', "must be a JSON object"),
  ('{"arguments": {}}', "string \"name\""),
  ('{"name": "f", "arguments": [1]}', "must be a JSON object"),
  ('{"name": "f", "arguments": "not json"}', "must be a JSON object"),
])
def test_hermes_malformed_calls_are_parse_errors(registry, body, error):
  parsed = HermesToolParser().parse(f"ok <tool_call>{body}</tool_call>"
                                    '<tool_call>{"name": "calculator", "arguments": '
                                    '{"expression": "2"}}</tool_call>')
  assert len(parsed.calls) == 2 and error in parsed.calls[0].error
  assert parsed.calls[1] == ToolCall("calculator", {"expression": "2"})  # the next still read
  results = registry.run(parsed.calls)
  assert [r.status for r in results] == ["parse_error", "ok"]
  assert error in results[0].message["content"]


def test_an_unclosed_call_is_a_parse_error():
  parsed = HermesToolParser().parse('a <tool_call>{"name": "calculator", "argum')
  assert parsed.content == "a" and "has no </tool_call>" in parsed.calls[0].error


def test_parser_registry():
  assert isinstance(parser_for("Qwen2.5"), HermesToolParser)
  assert isinstance(parser_for("hermes"), HermesToolParser)
  with pytest.raises(ValueError, match="no tool-call parser.*hermes"):
    parser_for("llama3")
  register_parser("my-family", lambda: HermesToolParser("<call>", "</call>"))
  assert parser_for("MY-FAMILY").parse('<call>{"name": "f"}</call>').calls == [ToolCall("f")]
