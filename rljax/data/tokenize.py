"""Tokenization: the prompt and the response are tokenized SEPARATELY and joined as ids.

  prompt_ids   = apply_chat_template(chat, add_generation_prompt=True)   (chat prompts)
               = tokenizer(prompt)["input_ids"]                        (plain prompts)
  response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos_id]
  input_ids    = prompt_ids + response_ids

Text is never decoded and re-encoded, so the ids a model is trained on are exactly the ids a
rollout conditions on (prompt) and produces (response, ending with the stop token). Templating
the full conversation and tokenizing it as one string can merge tokens across the
prompt/response boundary and double the BOS token; this scheme cannot.

Chat templates without a system role (Gemma 2's raises on one): a chat with a system turn is
templated with the system text folded into the first user turn (`fold_system_turn`, the way
Gemma 3's own template does it) when the template rejects it as it is.

Over-long examples (`max_length`): `overflow="truncate"` keeps the END of the prompt (where the
generation prompt is, TRL's `keep_end`) and the START of the response, keeping at least one
response token; `"drop"` skips the example; `"error"` raises. `tokenize_dataset` counts both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rljax.data.formats import (
  KTOExample,
  PreferenceExample,
  PromptExample,
  RankedExample,
  SFTExample,
  Text,
  parse_rows,
)

OVERFLOW_MODES = ("truncate", "drop", "error")


def _as_list(ids: Any) -> list[int]:
  if hasattr(ids, "keys") and "input_ids" in ids:  # a BatchEncoding
    ids = ids["input_ids"]
  return [int(i) for i in ids]


def as_chat(prompt: Text, chat: bool | None) -> list[dict[str, str]] | None:
  """The chat to template: a chat prompt, or a string wrapped as one user turn when chat=True."""
  if isinstance(prompt, list):
    if chat is False:
      raise ValueError("`chat=False` but the prompt is a list of chat messages.")
    return prompt
  return [{"role": "user", "content": prompt}] if chat else None


def fold_system_turn(messages: list[dict[str, str]]) -> list[dict[str, str]]:
  """The chat with its leading system turn folded into the first user turn: "system\n\nuser"
  (Gemma 3's template's own rendering of a system prompt). Unchanged without a system turn."""
  if not messages or messages[0].get("role") != "system":
    return messages
  system, rest = messages[0], list(messages[1:])
  if rest and rest[0].get("role") == "user":
    rest[0] = {**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}
  else:
    rest.insert(0, {"role": "user", "content": system["content"]})
  return rest


def apply_chat_template(tokenizer: Any, messages: list[dict[str, str]], *, tokenize: bool) -> Any:
  """`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`; a template that
  raises on the system turn (no system role: Gemma) gets `fold_system_turn(messages)`."""
  from jinja2.exceptions import TemplateError

  kwargs = dict(add_generation_prompt=True, tokenize=tokenize)
  if tokenize:
    kwargs["return_dict"] = False
  try:
    return tokenizer.apply_chat_template(messages, **kwargs)
  except TemplateError:
    folded = fold_system_turn(messages)
    if folded is messages:
      raise
    return tokenizer.apply_chat_template(folded, **kwargs)


def encode_prompt(
  tokenizer: Any, prompt: Text, *, chat: bool | None = None, add_special_tokens: bool = True
) -> list[int]:
  """Prompt ids. A chat (or a string with chat=True) goes through the tokenizer's chat template
  with `add_generation_prompt=True`; a plain string through `tokenizer(prompt)` (which adds BOS
  where the tokenizer does, unless add_special_tokens=False)."""
  messages = as_chat(prompt, chat)
  if messages is not None:
    return _as_list(apply_chat_template(tokenizer, messages, tokenize=True))
  return _as_list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])


def prompt_text(tokenizer: Any, prompt: Text, *, chat: bool | None = None) -> str:
  """The prompt as a string for reward functions (the rendered chat template for chats)."""
  messages = as_chat(prompt, chat)
  if messages is None:
    return prompt  # type: ignore[return-value]
  return apply_chat_template(tokenizer, messages, tokenize=False)


def encode_response(
  tokenizer: Any, response: str, *, add_eos: bool = True, eos_id: int | None = None
) -> list[int]:
  """Response ids: `tokenizer(response, add_special_tokens=False)` + [eos_id] when add_eos.

  `eos_id` defaults to `tokenizer.eos_token_id` (pass e.g. the end-of-turn id of a chat model).
  """
  ids = _as_list(tokenizer(response, add_special_tokens=False)["input_ids"])
  if add_eos:
    eos = tokenizer.eos_token_id if eos_id is None else eos_id
    if eos is None:
      raise ValueError("`add_eos=True` needs `eos_id` (the tokenizer has no eos_token_id).")
    ids.append(int(eos))
  return ids


def fit_length(
  prompt_ids: list[int], response_ids: list[int], max_length: int
) -> tuple[list[int], list[int], bool]:
  """(prompt, response, truncated) with len(prompt) + len(response) <= max_length.

  Keeps the last tokens of the prompt and the first of the response, and at least one response
  token when there is one.
  """
  if len(prompt_ids) + len(response_ids) <= max_length:
    return prompt_ids, response_ids, False
  keep_r = min(len(response_ids), max(max_length - len(prompt_ids), 1 if response_ids else 0))
  keep_p = max_length - keep_r
  return prompt_ids[len(prompt_ids) - keep_p:], response_ids[:keep_r], True


def _fit_many(prompt: list[int], responses: list[list[int]], max_length: int | None):
  """Fits a prompt with several responses: a common prompt cut, each response cut after it."""
  if max_length is None:
    return prompt, responses, False
  longest = max(responses, key=len)
  new_prompt, _, truncated = fit_length(prompt, longest, max_length)
  room = max_length - len(new_prompt)
  cut = [r[:room] for r in responses]
  return new_prompt, cut, truncated or any(len(c) < len(r) for c, r in zip(cut, responses))


def tokenize_prompt(tokenizer: Any, example: PromptExample, *, chat: bool | None = None,
                    max_length: int | None = None) -> dict[str, Any]:
  """{"prompt_ids", "text", "fields", "truncated"}; a long prompt keeps its last max_length ids."""
  ids = encode_prompt(tokenizer, example.prompt, chat=chat)
  truncated = max_length is not None and len(ids) > max_length
  if truncated:
    ids = ids[len(ids) - max_length:]
  return {"prompt_ids": ids, "text": prompt_text(tokenizer, example.prompt, chat=chat),
          "fields": dict(example.fields), "truncated": truncated}


def tokenize_sft(tokenizer: Any, example: SFTExample, *, chat: bool | None = None,
                 add_eos: bool = True, eos_id: int | None = None,
                 max_length: int | None = None) -> dict[str, Any]:
  """{"prompt_ids", "response_ids", "truncated"}."""
  prompt = encode_prompt(tokenizer, example.prompt, chat=chat)
  response = encode_response(tokenizer, example.response, add_eos=add_eos, eos_id=eos_id)
  prompt, (response,), truncated = _fit_many(prompt, [response], max_length)
  return {"prompt_ids": prompt, "response_ids": response, "truncated": truncated}


def tokenize_preference(tokenizer: Any, example: PreferenceExample, *, chat: bool | None = None,
                        add_eos: bool = True, eos_id: int | None = None,
                        max_length: int | None = None) -> dict[str, Any]:
  """{"prompt_ids", "chosen_ids", "rejected_ids", "truncated"} (one prompt cut for both)."""
  prompt = encode_prompt(tokenizer, example.prompt, chat=chat)
  pair = [encode_response(tokenizer, r, add_eos=add_eos, eos_id=eos_id)
          for r in (example.chosen, example.rejected)]
  prompt, (chosen, rejected), truncated = _fit_many(prompt, pair, max_length)
  return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
          "truncated": truncated}


def tokenize_kto(tokenizer: Any, example: KTOExample, *, chat: bool | None = None,
                 add_eos: bool = True, eos_id: int | None = None,
                 max_length: int | None = None) -> dict[str, Any]:
  """{"prompt_ids", "completion_ids", "label", "truncated"}."""
  prompt = encode_prompt(tokenizer, example.prompt, chat=chat)
  completion = encode_response(tokenizer, example.completion, add_eos=add_eos, eos_id=eos_id)
  prompt, (completion,), truncated = _fit_many(prompt, [completion], max_length)
  return {"prompt_ids": prompt, "completion_ids": completion, "label": bool(example.label),
          "truncated": truncated}


def tokenize_ranked(tokenizer: Any, example: RankedExample, *, chat: bool | None = None,
                    add_eos: bool = True, eos_id: int | None = None,
                    max_length: int | None = None) -> dict[str, Any]:
  """{"prompt_ids", "response_ids": [K lists, best first], "truncated"}."""
  prompt = encode_prompt(tokenizer, example.prompt, chat=chat)
  responses = [encode_response(tokenizer, r, add_eos=add_eos, eos_id=eos_id)
               for r in example.responses]
  prompt, responses, truncated = _fit_many(prompt, responses, max_length)
  return {"prompt_ids": prompt, "response_ids": responses, "truncated": truncated}


TOKENIZERS = {
  "prompt": tokenize_prompt,
  "sft": tokenize_sft,
  "preference": tokenize_preference,
  "kto": tokenize_kto,
  "ranked": tokenize_ranked,
}


def tokenize_dataset(
  tokenizer: Any,
  rows: Sequence[Any],
  kind: str,
  *,
  max_length: int | None = None,
  overflow: str = "truncate",
  **kwargs: Any,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Parses (dict rows) and tokenizes a dataset of `kind`; returns (records, stats).

  Args:
    tokenizer: a Hugging Face tokenizer (anything with `__call__`, `apply_chat_template` and
      `eos_token_id`).
    rows: dict rows (parsed with `rljax.data.formats.parse_rows`) or already-parsed examples.
    kind: "prompt", "sft", "preference", "kto" or "ranked".
    max_length: the longest prompt (kind "prompt") or prompt + response; None = no limit.
    overflow: "truncate" (default; record["truncated"] = True), "drop" or "error".
    **kwargs: `chat`, and for responses `add_eos` (default True) / `eos_id`.

  Returns:
    (records, {"num_examples", "truncated", "dropped"}).

  Raises:
    ValueError: unknown kind / overflow, a bad row (named by index), or with overflow="error" an
      example longer than max_length (named by index).

  Example:
    >>> records, stats = tokenize_dataset(tok, read_jsonl("pairs.jsonl"), "preference",
    ...                                   max_length=512)
  """
  if kind not in TOKENIZERS:
    raise ValueError(f"Unknown kind {kind!r}; valid choices: {', '.join(map(repr, TOKENIZERS))}.")
  if overflow not in OVERFLOW_MODES:
    raise ValueError(
      f"Unknown overflow {overflow!r}; valid choices: {', '.join(map(repr, OVERFLOW_MODES))}."
    )
  if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
    raise ValueError(f"`max_length` must be an int >= 2 or None; got {max_length!r}.")
  rows = list(rows)
  if rows and isinstance(rows[0], dict):
    rows = parse_rows(rows, kind)
  records, stats = [], {"num_examples": len(rows), "truncated": 0, "dropped": 0}
  for i, example in enumerate(rows):
    record = TOKENIZERS[kind](tokenizer, example, max_length=max_length, **kwargs)
    if record["truncated"]:
      if overflow == "error":
        raise ValueError(f"example {i} is longer than `max_length` ({max_length}) tokens.")
      if overflow == "drop":
        stats["dropped"] += 1
        continue
      stats["truncated"] += 1
    records.append(record)
  return records, stats
