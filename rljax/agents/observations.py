"""Observation tokens: the exact ids a multi-turn rollout appends after a policy turn, taken from
the chat template without ever tokenising the conversation again.

Chat templates are not prefix-stable (Qwen3's drops the <think> blocks of earlier turns, some
add separators), so re-rendering the history can change ids the policy already sampled. The ids
of the observation messages M are instead the template's delta over a fixed dummy conversation D
(the practice of verl and Tunix):

  observation_tokens(M) = ids(render(D + M, add_generation_prompt=True))  minus  ids(render(D))

that is, the first ids are those of D, which is checked (a ValueError names `dummy` otherwise),
and the rest are returned: M's messages and the header of the next assistant turn, after which
the policy decodes its next turn. D is the first of ([user], [user, assistant]) whose ids are a
prefix of those of D + [user] (a template that wants user and assistant to alternate, like
Gemma's, gets the second), or `dummy=`.

End of turn. The template closes an assistant message with `end_of_turn_tokens()` (Qwen:
`<|im_end|>` `\\n`), found by rendering an assistant message with a marker content and taking
the text after it. The policy stops on the first of them (its stop token) or on a stop string
or its token budget, so some are not sampled; `close_turn(action_tokens, stopped_by)` gives the
ones to append, mask 0 in the loss, before the next observation.

Control tokens. The rendered text is encoded as the tokenizer always does, except that text from
a message's content is encoded with `split_special_tokens=True`: a tool result holding the text
"<|im_end|>" gets the ids of those characters, never the <|im_end|> id, while the template's own
special tokens keep theirs. How: before rendering, every special-token string in a content is
replaced by a private-use marker; the rendered text is cut at the special tokens (now only the
template's) and each piece, markers restored, is encoded with `split_special_tokens=True` — the
tokenizer's own segmentation at special tokens, their lstrip / rstrip included — and the pieces
joined with the special ids (the text this encodes is checked to be the template's rendering of
the real contents). A content without special-token strings leaves the text as it is: then the
ids are exactly `tokenizer(text, add_special_tokens=False)`'s. As with `split_special_tokens`,
only tokens marked special are protected: added tokens that are not special (Qwen2.5's
<tool_call>, <tool_response>) are read in a content as in the template.

Thinking tokens. The history is never re-rendered: a policy turn's ids are the sampled ones, an
observation's are the delta above appended after them. A template that drops or rewrites the
<think> blocks of earlier assistant turns (Qwen3) therefore cannot change the ids trained on:
the trajectory is exactly the sequence the policy was conditioned on when it sampled each turn,
its reasoning included (which the template would drop when rendering the whole conversation;
that is the price of exact pass-through). D renders no assistant reasoning to drop.
`chat_template_kwargs` (e.g. `enable_thinking=False`) go to every render, so a generation
prompt that depends on them (Qwen3's empty `<think>\\n\\n</think>\\n\\n`) is part of each
observation's delta as it is of the first prompt's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from rljax.agents.environment import OBSERVATION_ROLES, Observation, check_message

# How a policy turn ended (`ChatTurns.close_turn`).
STOP_TOKEN, STOP_STRING, LENGTH = "stop_token", "stop_string", "length"
STOP_REASONS = (STOP_TOKEN, STOP_STRING, LENGTH)

DEFAULT_DUMMIES = (
  ({"role": "user", "content": "hi"},),
  ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}),
)
# Private-use code points: `_OPEN k _CLOSE` stands for the k-th protected string of a render.
_OPEN, _CLOSE, _ASSISTANT_MARK = "\ue000", "\ue001", "\ue002"
_MARKER_RE = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def _ids(encoding: Any) -> list[int]:
  ids = encoding["input_ids"] if hasattr(encoding, "keys") else encoding
  return [int(i) for i in ids]


class ChatTurns:
  """Token ids of chat turns for multi-turn rollouts (see the module docstring).

  tokenizer: a Hugging Face tokenizer with a chat template.
  dummy: the dummy conversation D (None: the first default that works).
  chat_template_kwargs: extra arguments of every render (e.g. {"enable_thinking": False}).
  """

  def __init__(self, tokenizer: Any, *, dummy: Sequence[Mapping[str, str]] | None = None,
               chat_template_kwargs: Mapping[str, Any] | None = None):
    if not callable(getattr(tokenizer, "apply_chat_template", None)) or not getattr(
        tokenizer, "chat_template", None):
      raise ValueError(f"`tokenizer` must be a Hugging Face tokenizer with a chat template; got "
                       f"{type(tokenizer).__name__} without one.")
    self.tokenizer = tokenizer
    self.chat_template_kwargs = dict(chat_template_kwargs or {})
    special = [t for t in tokenizer.added_tokens_decoder.values() if t.special]
    self._special = {t.content: t for t in special}
    self._special_ids = {t.content: int(tokenizer.convert_tokens_to_ids(t.content))
                         for t in special}
    protected = sorted(self._special, key=len, reverse=True) + [_OPEN, _CLOSE]
    self._protected_re = re.compile("|".join(map(re.escape, protected)))
    self._special_re = re.compile("|".join(map(re.escape, protected[:-2])) or "(?!)")
    self.dummy, self._dummy_ids = self._choose_dummy(dummy)
    self._end_of_turn = self._derive_end_of_turn()

  # -- rendering and encoding ------------------------------------------------------------------

  def _render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool,
              tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    return self.tokenizer.apply_chat_template(
      [dict(m) for m in messages], tokenize=False, add_generation_prompt=add_generation_prompt,
      tools=None if tools is None else list(tools), **self.chat_template_kwargs)

  def _encode_text(self, text: str, *, split_special_tokens: bool = False) -> list[int]:
    return _ids(self.tokenizer(text, add_special_tokens=False,
                               split_special_tokens=split_special_tokens))

  def encode(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool,
             tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """ids(render(messages)), the special-token strings of the contents encoded as text (see the
    module docstring)."""
    originals: list[str] = []

    def protect(match: re.Match) -> str:
      originals.append(match.group(0))
      return f"{_OPEN}{len(originals) - 1}{_CLOSE}"

    escaped = [{**m, "content": self._protected_re.sub(protect, m["content"])}
               if isinstance(m.get("content"), str) else dict(m) for m in messages]
    text = self._render(escaped, add_generation_prompt=add_generation_prompt, tools=tools)
    if not originals:
      return self._encode_text(text)

    def restore(piece: str) -> str:
      return _MARKER_RE.sub(lambda m: originals[int(m.group(1))], piece)

    real = self._render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    if restore(text) != real:
      raise ValueError("The chat template renders a message content differently once its "
                       "special-token strings are replaced by markers, so the content's text "
                       "cannot be told from the template's special tokens; rendered: "
                       f"{real!r}.")
    pieces, specials, at = [], [], 0
    for match in self._special_re.finditer(text):
      pieces.append(text[at:match.start()])
      specials.append(match.group(0))
      at = match.end()
    pieces.append(text[at:])
    for k, token in enumerate(specials):  # the whitespace an added token absorbs
      if self._special[token].lstrip:
        pieces[k] = pieces[k].rstrip()
      if self._special[token].rstrip:
        pieces[k + 1] = pieces[k + 1].lstrip()
    ids = self._encode_text(restore(pieces[0]), split_special_tokens=True)
    for token, piece in zip(specials, pieces[1:]):
      ids.append(self._special_ids[token])
      ids.extend(self._encode_text(restore(piece), split_special_tokens=True))
    return ids

  # -- the dummy conversation and the end of turn ----------------------------------------------

  def _delta(self, dummy: Sequence[dict], dummy_ids: list[int], messages: Sequence[dict]
             ) -> list[int]:
    ids = self.encode([*dummy, *messages], add_generation_prompt=True)
    if ids[:len(dummy_ids)] != dummy_ids:
      k = next((i for i, (a, b) in enumerate(zip(ids, dummy_ids)) if a != b),
               min(len(ids), len(dummy_ids)))
      raise ValueError(
        "The chat template renders the dummy conversation `dummy` differently when messages "
        "follow it: ids(render(dummy)) is not a prefix of ids(render(dummy + messages)) (they "
        f"differ from token {k}: {dummy_ids[k:k + 8]} vs {ids[k:k + 8]}). Pass `dummy=` a "
        "conversation whose rendering does not change when messages are appended.")
    return ids[len(dummy_ids):]

  def _choose_dummy(self, dummy) -> tuple[tuple[dict, ...], list[int]]:
    candidates = DEFAULT_DUMMIES if dummy is None else (dummy,)
    probe = [{"role": "user", "content": "hi"}]
    failures = []
    for candidate in candidates:
      candidate = tuple(check_message(m, f"dummy[{i}]") for i, m in enumerate(candidate))
      try:
        ids = self.encode(candidate, add_generation_prompt=False)
        self._delta(candidate, ids, probe)
        return candidate, ids
      except Exception as e:  # noqa: BLE001 — a template raising on this dummy: try the next
        if dummy is not None:
          raise ValueError(f"`dummy` does not work with this chat template: {e}") from e
        failures.append(f"{[m['role'] for m in candidate]}: {type(e).__name__}: {e}")
    raise ValueError("No default dummy conversation works with this chat template; pass "
                     "`dummy=`. " + " | ".join(failures))

  def _derive_end_of_turn(self) -> tuple[int, ...]:
    users = [i for i, m in enumerate(self.dummy) if m["role"] == "user"]
    if not users:
      raise ValueError("`dummy` needs a user message (the end of turn is found by rendering an "
                       "assistant reply to it).")
    chat = [*self.dummy[:users[-1] + 1], {"role": "assistant", "content": _ASSISTANT_MARK}]
    text = self._render(chat, add_generation_prompt=False)
    if text.count(_ASSISTANT_MARK) != 1:
      raise ValueError("The chat template does not render an assistant message's content as it "
                       "is, so its end-of-turn tokens cannot be read off.")
    return tuple(self._encode_text(text.split(_ASSISTANT_MARK)[1]))

  # -- public ----------------------------------------------------------------------------------

  def prompt_tokens(self, messages: Sequence[Mapping[str, str]], *,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """The first prompt's ids: render(messages, add_generation_prompt=True, tools=tools), the
    contents' special-token strings encoded as text. `tools`: JSON schemas (the HF `tools=`
    convention, e.g. `ToolRegistry.schemas()`)."""
    messages = [check_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    return self.encode(messages, add_generation_prompt=True, tools=tools)

  def observation_tokens(self, observation: Observation | Sequence[Mapping[str, str]]
                         ) -> list[int]:
    """The ids to append for an observation: its `tokens` when it has them, else the template's
    delta of its messages over the dummy conversation (see the module docstring)."""
    if isinstance(observation, Observation):
      if observation.tokens is not None:
        return list(observation.tokens)
      messages = observation.messages
    else:
      messages = tuple(check_message(m, f"messages[{i}]", OBSERVATION_ROLES)
                       for i, m in enumerate(observation))
    return self._delta(self.dummy, self._dummy_ids, messages)

  def end_of_turn_tokens(self) -> list[int]:
    """The ids the template puts after an assistant message's content (Qwen: <|im_end|> \\n)."""
    return list(self._end_of_turn)

  def close_turn(self, action_tokens: Sequence[int], stopped_by: str) -> list[int]:
    """The end-of-turn ids to append (mask 0) after a policy turn that did not sample them all.

    With e = end_of_turn_tokens(): e[k:] for the largest k such that the turn ends with e[:k]
    (k = len(e): nothing). A turn stopped by its stop token (`stopped_by="stop_token"`) that
    ends with a token of e ends its turn there: only what follows that token's last place in e
    is appended (Qwen: "<|im_end|>" sampled, "\\n" appended). `stopped_by`: "stop_token",
    "stop_string" or "length" (the turn's token budget ran out).
    """
    if stopped_by not in STOP_REASONS:
      raise ValueError(f"`stopped_by` must be one of {STOP_REASONS}; got {stopped_by!r}.")
    action = [int(t) for t in action_tokens]
    eot = list(self._end_of_turn)
    if stopped_by == STOP_TOKEN and action and action[-1] in eot:
      return eot[len(eot) - eot[::-1].index(action[-1]):]
    for k in range(min(len(eot), len(action)), 0, -1):
      if action[len(action) - k:] == eot[:k]:
        return eot[k:]
    return eot
