"""Tool-call parsers: the tool calls in a policy turn's text, pluggable per model family.

A parser is `parse(text) -> ParsedTurn(content, calls)`: `content` is the text outside the calls
(stripped), `calls` the `ToolCall`s in the order written, each with a `name` and `arguments`, or
an `error` when it could not be read — never an exception: `ToolRegistry.run` answers a call
with an error by a "parse_error" tool message, so the model sees what it got wrong.

The text is read as decoded: where the markers are special tokens, decode with
`skip_special_tokens=False` (Qwen2.5's <tool_call> is an added token that is not special, so
it is kept either way).

Hermes / Qwen (`HermesToolParser`; families "hermes", "qwen", "qwen2", "qwen2.5", "qwen3"): the
format Qwen's chat template asks for when given `tools=`

  <tool_call>
  {"name": <function-name>, "arguments": <args-json-object>}
  </tool_call>

Each `<tool_call>...</tool_call>` block holds one JSON object with a string "name" and an
object "arguments" (a JSON string holding an object is accepted, as some models write it;
missing: {}). A `<tool_call>` not closed (the turn cut by its token budget) is a parse error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rljax.agents.tools import ToolCall


@dataclass(frozen=True)
class ParsedTurn:
  """A policy turn read by a parser: the text outside the calls and the calls, in order."""
  content: str
  calls: list[ToolCall] = field(default_factory=list)


class ToolParser(Protocol):
  def parse(self, text: str) -> ParsedTurn:
    ...


def _snippet(text: str, limit: int = 200) -> str:
  return text if len(text) <= limit else text[:limit] + "..."


class HermesToolParser:
  """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (module docstring)."""

  def __init__(self, open_tag: str = "<tool_call>", close_tag: str = "</tool_call>"):
    if not open_tag or not close_tag:
      raise ValueError(f"`open_tag` and `close_tag` must be non-empty; got {open_tag!r}, "
                       f"{close_tag!r}.")
    self.open_tag, self.close_tag = open_tag, close_tag
    self._block = re.compile(f"{re.escape(open_tag)}(.*?){re.escape(close_tag)}", re.S)

  def _read(self, body: str) -> ToolCall:
    try:
      value = json.loads(body)
    except json.JSONDecodeError as e:
      return ToolCall(error=f"could not parse the tool call {_snippet(body.strip())!r} as JSON: "
                            f"{e.msg} (char {e.pos}).")
    if not isinstance(value, dict):
      return ToolCall(error=f"a tool call must be a JSON object with \"name\" and \"arguments\"; "
                            f"got {_snippet(body.strip())!r}.")
    name, arguments = value.get("name"), value.get("arguments", {})
    if not isinstance(name, str) or not name:
      return ToolCall(error=f"a tool call needs a string \"name\"; got "
                            f"{_snippet(body.strip())!r}.")
    if isinstance(arguments, str):
      try:
        arguments = json.loads(arguments)
      except json.JSONDecodeError:
        pass
    if not isinstance(arguments, dict):
      return ToolCall(name=name, error=f"the \"arguments\" of {name} must be a JSON object; got "
                                       f"{_snippet(json.dumps(arguments))}.")
    return ToolCall(name=name, arguments=arguments)

  def parse(self, text: str) -> ParsedTurn:
    if not isinstance(text, str):
      raise ValueError(f"`text` must be a string; got {type(text).__name__}.")
    calls, outside, at = [], [], 0
    for match in self._block.finditer(text):
      outside.append(text[at:match.start()])
      calls.append(self._read(match.group(1)))
      at = match.end()
    rest = text[at:]
    start = rest.find(self.open_tag)
    if start >= 0:
      outside.append(rest[:start])
      calls.append(ToolCall(error=f"the tool call {_snippet(rest[start:])!r} has no "
                                  f"{self.close_tag}."))
    else:
      outside.append(rest)
    return ParsedTurn("".join(outside).strip(), calls)


_PARSERS: dict[str, Callable[[], Any]] = {}


def register_parser(family: str, factory: Callable[[], Any]) -> None:
  """Makes `parser_for(family)` return `factory()` (a case-insensitive family name)."""
  if not isinstance(family, str) or not family:
    raise ValueError(f"`family` must be a non-empty string; got {family!r}.")
  if not callable(factory):
    raise ValueError(f"`factory` must be callable; got {type(factory).__name__}.")
  _PARSERS[family.lower()] = factory


def parser_for(family: str) -> ToolParser:
  """A new parser for the model `family` (e.g. "qwen2.5", "hermes")."""
  key = family.lower() if isinstance(family, str) else family
  if key not in _PARSERS:
    raise ValueError(f"`family` {family!r} has no tool-call parser; the families are: "
                     f"{', '.join(sorted(_PARSERS))} (or `register_parser`).")
  return _PARSERS[key]()


for _family in ("hermes", "qwen", "qwen2", "qwen2.5", "qwen3"):
  register_parser(_family, HermesToolParser)
