"""The addition task: problems, a careless demonstrator, a character tokenizer, the verifier.

A problem is a + b with a, b uniform in [0, 10^digits). Every number is zero-padded (operands to
`digits`, the sum to digits + 1) and, by default (`reverse=True`), written least-significant digit
first, so 456 + 789 = 1245 reads "654+987=" → "5421" (with reverse=False: "456+789=" → "1245").
The reversed format (Lee et al. 2023, "Teaching arithmetic to small transformers") puts digit i
of the answer at a fixed distance from digit i of each operand and after the digits it depends
on, so a 2-layer model learns it in about a minute on a CPU; the most-significant-first format
needs many times more SFT steps.

The demonstrator is a student who FORGETS TO CARRY with probability `forget_prob` (default 0.75)
on every problem: each column is written as (a_i + b_i) mod 10 and the carry is dropped, except
the leading column, which is written in full (456+789 → 1135, the classic carry error). On a
problem without any carry the two answers coincide, so the demonstrations are right on all
carry-free problems (≈ 27% for 3 digits) and on a fraction 1 − forget_prob of the others
(≈ 46% of all demonstrations with the default).

Why this makes RL, not SFT, the fix: a model that imitates the demonstrator puts most of its
probability on the carry-dropped answer of a carry problem, so GREEDY decoding answers mostly
the carry-free problems correctly, while SAMPLING still finds the right answer a good part of
the time — exactly the signal a verifiable exact-match reward turns into a large greedy gain.
(Measured: with forget_prob = 0.6 a well-trained SFT model is already right on ~70% of held-out
problems greedily — it generalises the carry rule more than the 60/40 coin suggests — and the
RL gain shrinks to ~25 points; 0.75 keeps the SFT model near the carry-free floor.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SYMBOLS = tuple("0123456789+=")


def char_tokenizer() -> Any:
  """A `transformers.PreTrainedTokenizerFast` over single characters, built in code (no files).

  Vocabulary: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then "0".."9", "+", "=". Encoding a string
  adds <bos> in front (`add_special_tokens=True`, as Llama tokenizers do); decoding joins the
  characters without spaces.

  Example:
    >>> tok = char_tokenizer()
    >>> tok("12+3=")["input_ids"]
    [1, 5, 6, 14, 7, 15]
  """
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  vocab = {t: i for i, t in enumerate((PAD, BOS, EOS, UNK) + SYMBOLS)}
  core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  core.decoder = decoders.Fuse()
  core.post_processor = processors.TemplateProcessing(
    single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
  return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS,
                                 pad_token=PAD, unk_token=UNK)


def column_digits(n: int, digits: int) -> list[int]:
  """Least-significant digit first, zero-padded: (456, 3) → [6, 5, 4]."""
  return [(n // 10**i) % 10 for i in range(digits)]


def carry_dropped_sum(a: int, b: int, digits: int) -> int:
  """The sum with every carry forgotten; the leading column is written in full.

    456 + 789 → columns 6+9→5, 5+8→3, 4+7→11  →  1135      (correct: 1245)
  """
  da, db = column_digits(a, digits), column_digits(b, digits)
  total = (da[-1] + db[-1]) * 10 ** (digits - 1)
  for i in range(digits - 1):
    total += ((da[i] + db[i]) % 10) * 10**i
  return total


def has_carry(a: int, b: int, digits: int) -> bool:
  """True when a column below the leading one produces a carry (so forgetting carries changes
  the answer)."""
  return carry_dropped_sum(a, b, digits) != a + b


def prompt_text(a: int, b: int, digits: int, reverse: bool = True) -> str:
  """Operands zero-padded to `digits`, least-significant digit first when `reverse`:
  (7, 452, 3) → "700+254=" ("007+452=" with reverse=False)."""
  x, y = f"{a:0{digits}d}", f"{b:0{digits}d}"
  return f"{x[::-1]}+{y[::-1]}=" if reverse else f"{x}+{y}="


def written(n: int, digits: int, reverse: bool) -> str:
  """The answer as written: zero-padded to digits + 1, least-significant digit first when
  `reverse` (459 → "0459", reversed "9540")."""
  text = f"{n:0{digits + 1}d}"
  return text[::-1] if reverse else text


def sample_problems(n: int, rng: np.random.Generator, *, digits: int = 3,
                    exclude: set[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
  """`n` distinct (a, b) pairs with a, b uniform in [0, 10^digits), none in `exclude`."""
  high = 10**digits
  if n + len(exclude or ()) > high * high:
    raise ValueError(f"cannot draw {n} distinct problems with `digits`={digits}.")
  seen, out = set(exclude or ()), []
  while len(out) < n:
    a, b = (int(x) for x in rng.integers(0, high, size=2))
    if (a, b) not in seen:
      seen.add((a, b))
      out.append((a, b))
  return out


def demonstrations(problems: Sequence[tuple[int, int]], rng: np.random.Generator, *,
                   digits: int, forget_prob: float = 0.75, reverse: bool = True
                   ) -> list[dict[str, str]]:
  """SFT rows {"prompt", "response"} from the careless demonstrator (see the module doc)."""
  if not 0.0 <= forget_prob <= 1.0:
    raise ValueError(f"`forget_prob` must be in [0, 1]; got {forget_prob!r}.")
  forget = rng.random(len(problems)) < forget_prob
  return [{"prompt": prompt_text(a, b, digits, reverse),
           "response": written(carry_dropped_sum(a, b, digits) if f else a + b, digits, reverse)}
          for (a, b), f in zip(problems, forget)]


def prompt_rows(problems: Sequence[tuple[int, int]], *, digits: int, reverse: bool = True
                ) -> list[dict[str, str]]:
  """Prompt rows {"prompt", "answer"}: the answer as written is a dataset field for the reward."""
  return [{"prompt": prompt_text(a, b, digits, reverse),
           "answer": written(a + b, digits, reverse)} for a, b in problems]


def exact_match_reward(prompts: Sequence[str] | None, completions: Sequence[str], *,
                       answer: Sequence[str], **fields: Any) -> np.ndarray:
  """The verifier: 1.0 where the completion is exactly the decimal sum, else 0.0 (float32 [B]).

  Stricter than `rljax.rewards.math_answer_reward` (which would accept "0112" for 112): the
  task's answer has exactly one spelling.
  """
  del prompts, fields
  if len(completions) != len(answer):
    raise ValueError(f"`completions` has {len(completions)} rows but `answer` {len(answer)}.")
  return np.asarray([c.strip() == str(r) for c, r in zip(completions, answer)], np.float32)


def preference_pairs(samples: Sequence[tuple[str, Sequence[str], str]], *, max_pairs: int,
                     distinct: bool = True) -> list[dict[str, str]]:
  """{"prompt", "chosen", "rejected"} rows from verified samples [(prompt, completions, answer)]:
  for each prompt with a correct and an incorrect completion, chosen = its first correct one and
  rejected = each incorrect one in sampling order (`distinct`: each different wrong answer once;
  otherwise a repeated mistake gives repeated pairs, so frequent mistakes weigh more), at most
  `max_pairs` per prompt. All-correct and all-wrong prompts give no pair."""
  rows = []
  for prompt, completions, answer in samples:
    right = exact_match_reward(None, completions, answer=[answer] * len(completions)) > 0.5
    if not right.any() or right.all():
      continue
    chosen = completions[int(np.argmax(right))]
    wrong = [c for c, r in zip(completions, right) if not r]
    if distinct:
      wrong = list(dict.fromkeys(wrong))
    rows += [{"prompt": prompt, "chosen": chosen, "rejected": w} for w in wrong[:max_pairs]]
  return rows
