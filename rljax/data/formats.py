"""Dataset row formats (the TRL conventions), parsed into small frozen records.

A "text" is either a string or a chat: a list of {"role": str, "content": str} messages.

  prompt data      {"prompt": text, ...extra fields}       → PromptExample (fields kept, e.g. answer)
                   or {"messages": chat, ...}              (the chat is the prompt)
  SFT data         {"prompt": text, "response": text}     → SFTExample
                   ("completion" is accepted for "response"), or {"messages": chat} whose last
                   message is the assistant's response
  preference data  {"prompt": text, "chosen": text, "rejected": text}  → PreferenceExample
                   or the implicit-prompt form {"chosen": chat/str, "rejected": chat/str}: the
                   prompt is their common prefix (TRL's `extract_prompt`)
  unpaired (KTO)   {"prompt": text, "completion": text, "label": bool}  → KTOExample
  ranked lists     {"prompt": text, "responses": [text, ...]} best first → RankedExample

A response given as a chat (e.g. [{"role": "assistant", "content": "4"}]) is reduced to the
content of its assistant message(s): rljax tokenizes the response text separately from the prompt
(prompt with the chat template and the generation prompt, response as plain text + EOS), the same
tokens a rollout after `add_generation_prompt=True` produces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

Message = dict[str, str]
Text = Union[str, list[Message]]


@dataclass(frozen=True)
class PromptExample:
  prompt: Text
  fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SFTExample:
  prompt: Text
  response: str


@dataclass(frozen=True)
class PreferenceExample:
  prompt: Text
  chosen: str
  rejected: str


@dataclass(frozen=True)
class KTOExample:
  prompt: Text
  completion: str
  label: bool


@dataclass(frozen=True)
class RankedExample:
  prompt: Text
  responses: tuple[str, ...]


def _where(index: int | None) -> str:
  return "" if index is None else f" (row {index})"


def is_chat(value: Any) -> bool:
  """True for a list of {"role", "content"} dicts."""
  return (
    isinstance(value, list)
    and all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)
  )


def _text(row: Mapping[str, Any], key: str, index: int | None) -> Text:
  if key not in row:
    raise ValueError(f"missing field `{key}`{_where(index)}; the row has {sorted(row)}.")
  value = row[key]
  if isinstance(value, str):
    return value
  if is_chat(value) and value:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
  raise ValueError(
    f"field `{key}`{_where(index)} must be a string or a non-empty list of "
    f"{{'role', 'content'}} messages; got {type(value).__name__}."
  )


def response_text(value: Text, key: str = "response", index: int | None = None) -> str:
  """A response as a string: the string itself, or the content of a chat's assistant messages."""
  if isinstance(value, str):
    return value
  roles = {m["role"] for m in value}
  if roles != {"assistant"}:
    raise ValueError(
      f"field `{key}`{_where(index)}: a chat response must hold only assistant messages; "
      f"got roles {sorted(roles)}."
    )
  return "".join(m["content"] for m in value)


def parse_prompt(row: Mapping[str, Any], index: int | None = None) -> PromptExample:
  """`prompt` (or `messages`) plus every other field of the row."""
  key = "prompt" if "prompt" in row else "messages"
  prompt = _text(row, key if key in row else "prompt", index)
  return PromptExample(prompt, {k: v for k, v in row.items() if k != key})


def parse_sft(row: Mapping[str, Any], index: int | None = None) -> SFTExample:
  """`prompt` + `response` (or `completion`), or `messages` ending with the assistant's turn."""
  if "prompt" not in row and "messages" in row:
    chat = _text(row, "messages", index)
    if isinstance(chat, str) or len(chat) < 2 or chat[-1]["role"] != "assistant":
      raise ValueError(
        f"field `messages`{_where(index)} must be a chat of >= 2 messages ending with an "
        "assistant message."
      )
    return SFTExample(chat[:-1], chat[-1]["content"])
  key = "response" if "response" in row else "completion"
  if key not in row:
    raise ValueError(f"missing field `response`{_where(index)}; the row has {sorted(row)}.")
  return SFTExample(_text(row, "prompt", index), response_text(_text(row, key, index), key, index))


def common_prefix_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
  """(prompt, chosen, rejected) of an implicit-prompt pair, as TRL's `extract_prompt`.

  Chats: the prompt is the longest common prefix of messages. Strings: the longest common
  character prefix, moved back by one when the first difference follows a space (the space goes to
  the responses).
  """
  if isinstance(chosen, str) != isinstance(rejected, str):
    raise ValueError("`chosen` and `rejected` must both be strings or both chats.")
  idx = 0
  limit = min(len(chosen), len(rejected))
  while idx < limit and chosen[idx] == rejected[idx]:
    idx += 1
  if isinstance(chosen, str) and idx < limit and idx > 0 and chosen[idx - 1] == " ":
    idx -= 1
  return chosen[:idx], chosen[idx:], rejected[idx:]


def parse_preference(row: Mapping[str, Any], index: int | None = None) -> PreferenceExample:
  """Explicit (`prompt`, `chosen`, `rejected`) or implicit-prompt (`chosen`, `rejected`) pairs."""
  chosen, rejected = _text(row, "chosen", index), _text(row, "rejected", index)
  if "prompt" in row:
    prompt = _text(row, "prompt", index)
  else:
    try:
      prompt, chosen, rejected = common_prefix_prompt(chosen, rejected)
    except ValueError as err:
      raise ValueError(f"{err}{_where(index)}") from err
    if not prompt:
      raise ValueError(f"`chosen` and `rejected` share no prompt prefix{_where(index)}.")
  return PreferenceExample(
    prompt, response_text(chosen, "chosen", index), response_text(rejected, "rejected", index)
  )


def parse_kto(row: Mapping[str, Any], index: int | None = None) -> KTOExample:
  """`prompt`, `completion`, `label` (a bool: desirable or not)."""
  if "label" not in row:
    raise ValueError(f"missing field `label`{_where(index)}; the row has {sorted(row)}.")
  label = row["label"]
  if not isinstance(label, bool):
    raise ValueError(f"field `label`{_where(index)} must be a bool; got {label!r}.")
  completion = response_text(_text(row, "completion", index), "completion", index)
  return KTOExample(_text(row, "prompt", index), completion, label)


def parse_ranked(row: Mapping[str, Any], index: int | None = None) -> RankedExample:
  """`prompt` and `responses` (>= 2, ranked best first)."""
  responses = row.get("responses")
  if not isinstance(responses, Sequence) or isinstance(responses, str) or len(responses) < 2:
    raise ValueError(
      f"field `responses`{_where(index)} must be a list of >= 2 responses ranked best first."
    )
  texts = tuple(
    response_text(_text({"responses": r}, "responses", index), "responses", index)
    for r in responses
  )
  return RankedExample(_text(row, "prompt", index), texts)


PARSERS = {
  "prompt": parse_prompt,
  "sft": parse_sft,
  "preference": parse_preference,
  "kto": parse_kto,
  "ranked": parse_ranked,
}


def parse_rows(rows: Sequence[Mapping[str, Any]], kind: str) -> list:
  """Parses every row with the parser of `kind` ("prompt", "sft", "preference", "kto", "ranked");
  errors name the row index."""
  if kind not in PARSERS:
    raise ValueError(f"Unknown kind {kind!r}; valid choices: {', '.join(map(repr, PARSERS))}.")
  parse = PARSERS[kind]
  return [parse(row, i) for i, row in enumerate(rows)]
