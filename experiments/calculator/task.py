"""The calculator task: multiplication beyond a small model's reach, with a calculator tool.

A problem is a × b with a uniform in [100, 1000) and b in [10, 100) (a 4- or 5-digit product),
asked as "a*b" in a chat. The policy may answer at once, or call the calculator first in the
Hermes / Qwen format and answer after reading its result:

  <|im_start|>user\\n347*29<|im_end|>\\n<|im_start|>assistant\\n
  <tool_call>{"name": "calculator", "arguments": {"expression": "347*29"}}</tool_call><|im_end|>
  \\n<|im_start|>user\\n<tool_response>\\n10063\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n
  10063<|im_end|>

(the first and third lines the prompt and the observation, mask 0; the second and fourth the
policy's turns). The demonstrator uses the tool on only `tool_prob` (30 %) of the problems and
answers the rest in its head, correctly: a 2-layer model imitating it answers directly most of
the time and then gets the product mostly wrong (it cannot learn 3 × 2-digit multiplication
from a few thousand examples), and is right when it calls the tool (copying the result is
easy). The exact-match reward therefore favours the tool, and RL must raise both the tool-use
rate and the accuracy.

The tokenizer is character-level with whole-word tokens for the chat and tool markup (each a
token, as in Qwen's vocabulary; the JSON of a call is two tokens around the expression), built
in code: no download.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rljax.agents import ChatTurns, ToolEnvironment, ToolRegistry, calculator

PAD, EOS, UNK = "<|endoftext|>", "<|im_end|>", "<unk>"
SPECIAL = (PAD, "<|im_start|>", EOS, UNK)
# Added (not special) tokens, as in Qwen2.5's vocabulary: decoded text keeps them, so the
# tool-call parser reads them.
MARKUP = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "user",
          "assistant", "system", "tool", '{"name": "calculator", "arguments": {"expression": "',
          '"}}')
CHARS = tuple("0123456789*+-=/()., \n") + tuple("abcdefghijklmnopqrstuvwxyz")
# Qwen2.5's layout of turns and tool responses, without its system prompt.
CHAT_TEMPLATE = (
  "{% for m in messages %}"
  "{% if m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n"
  "</tool_response><|im_end|>\n"
  "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
  "{% endfor %}"
  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALL_PREFIX, CALL_SUFFIX = MARKUP[8], MARKUP[9]


def calculator_tokenizer() -> Any:
  """A `PreTrainedTokenizerFast`: specials <|endoftext|>=0 <|im_start|>=1 <|im_end|>=2 <unk>=3,
  then `CHARS` one per character, then the `MARKUP` words; the chat template above."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
  core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  core.decoder = decoders.Fuse()
  core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
  core.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP])
  return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD,
                                 unk_token=UNK, chat_template=CHAT_TEMPLATE)


def sample_problems(n: int, rng: np.random.Generator, *, exclude: set | None = None
                    ) -> list[tuple[int, int]]:
  """`n` distinct (a, b), a in [100, 1000), b in [10, 100), none in `exclude`."""
  seen, out = set(exclude or ()), []
  while len(out) < n:
    a, b = int(rng.integers(100, 1000)), int(rng.integers(10, 100))
    if (a, b) not in seen:
      seen.add((a, b))
      out.append((a, b))
  return out


def problem_rows(problems: Sequence[tuple[int, int]]) -> list[dict[str, str]]:
  """Rows {"prompt": "a*b", "answer": "a·b"}: the examples of the environment."""
  return [{"prompt": f"{a}*{b}", "answer": str(a * b)} for a, b in problems]


def tool_call_text(expression: str) -> str:
  return f"<tool_call>{CALL_PREFIX}{expression}{CALL_SUFFIX}</tool_call>"


def exact_answer(text: str, example: dict) -> float:
  """1.0 when the final answer is exactly the product, else 0.0."""
  return float(text.strip() == example["answer"])


def calculator_environment(*, timeout_s: float = 5.0) -> ToolEnvironment:
  """The task as a `ToolEnvironment`: the calculator tool, the Hermes parser, exact match."""
  return ToolEnvironment(lambda example: [{"role": "user", "content": example["prompt"]}],
                         exact_answer, ToolRegistry([calculator], timeout_s=timeout_s),
                         parser="qwen", max_tool_calls=1)


def demonstration(chat: ChatTurns, row: dict[str, str], use_tool: bool
                  ) -> tuple[list[int], list[bool]]:
  """One demonstrated trajectory as (ids, loss mask): the prompt and the observation are
  masked; the turns end with <|im_end|> — the ids a multi-turn rollout holds for the same
  turns (the observation is `ChatTurns`' template delta, as the rollout appends it)."""
  tok, eos = chat.tokenizer, chat.tokenizer.eos_token_id

  def turn(text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [eos]

  messages = [{"role": "user", "content": row["prompt"]}]
  ids = chat.prompt_tokens(messages)
  mask = [False] * len(ids)
  if use_tool:
    call = turn(tool_call_text(row["prompt"]))
    result = {"role": "tool", "name": "calculator", "content": calculator(row["prompt"])}
    observation = chat.close_turn(call, "stop_token") + chat.observation_tokens([result])
    ids, mask = ids + call + observation, mask + [True] * len(call) + [False] * len(observation)
  answer = turn(row["answer"])
  return ids + answer, mask + [True] * len(answer)
