"""Verifiable math reward: extract the final answer of a completion and compare it numerically.

Extraction order (the first that applies wins):
  1. "#### 42"               GSM8K's answer marker (the last one in the text)
  2. "\\boxed{42}"           MATH / DeepSeek-style boxed answer (the last one; nested braces ok)
  3. "The answer is 42"      case-insensitive (the last occurrence)
  4. the last number in the text
Numbers are normalised before comparison: thousands separators ("1,234"), a leading "+",
"$" / "%" signs and trailing "." are dropped, "3/4" is a fraction, "-0.50" equals "-.5".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from rljax.rewards.base import batch_size, require_field

_NUMBER_RE = re.compile(
  r"[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:\s*/\s*(?:\d+(?:\.\d+)?))?"
)
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)

# Absolute tolerance of the numeric comparison.
MATCH_TOLERANCE = 1e-6


def _last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}), with balanced nested braces."""
  starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
  for start in reversed(starts):
    depth, i = 1, start
    while i < len(text) and depth:
      depth += {"{": 1, "}": -1}.get(text[i], 0)
      i += 1
    if depth == 0:
      return text[start:i - 1]
  return None


def extract_final_answer(text: str) -> str | None:
  """The final-answer string of `text` (see the module docstring for the order), or None.

  Example:
    >>> extract_final_answer("3 + 4 = 7\\n#### 7")
    '7'
    >>> extract_final_answer("so \\\\boxed{\\\\frac{3}{4}}")
    '\\\\frac{3}{4}'
  """
  hashes = _HASH_RE.findall(text)
  if hashes:
    return hashes[-1].strip()
  boxed = _last_boxed(text)
  if boxed is not None:
    return boxed.strip()
  said = _ANSWER_IS_RE.findall(text)
  if said:
    return said[-1].strip()
  numbers = _NUMBER_RE.findall(text)
  return numbers[-1].strip() if numbers else None


def _to_number(token: str) -> float | None:
  token = token.replace(",", "").replace(" ", "")
  try:
    if "/" in token:
      num, den = token.split("/")
      value = Fraction(num) / Fraction(den)
      return float(value)
    return float(token)
  except (ValueError, ZeroDivisionError):
    return None


def parse_number(text: Any) -> float | None:
  """A float from an answer string ("1,234", "$5", "3/4", "\\frac{3}{4}", "7."), else None.

  Numbers pass through. A string is cleaned (LaTeX \\frac{a}{b} → a/b, "$", "%", "\\!", "{}" and
  a trailing "." dropped) and its FIRST number is read, so "42 apples" → 42.0.

  Example:
    >>> parse_number("1,234.0"), parse_number("3/4"), parse_number("none")
    (1234.0, 0.75, None)
  """
  if isinstance(text, bool) or text is None:
    return None
  if isinstance(text, (int, float, np.integer, np.floating)):
    return float(text)
  s = str(text)
  s = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", s)
  s = s.replace("\\!", "").replace("$", "").replace("%", "").replace("(", "").replace(")", "")
  match = _NUMBER_RE.search(s)
  return None if match is None else _to_number(match.group(0))


def _reference_value(answer: Any) -> float | None:
  """The numeric value of a reference answer; a full GSM8K solution ("... #### 42") is allowed."""
  if isinstance(answer, str) and "####" in answer:
    answer = extract_final_answer(answer)
  return parse_number(answer)


def answers_match(predicted: Any, reference: Any, *, tol: float = MATCH_TOLERANCE) -> bool:
  """True when both parse to numbers with |p - r| <= tol (absolute)."""
  p, r = parse_number(predicted), _reference_value(reference)
  return p is not None and r is not None and abs(p - r) <= tol


def math_answer_reward(
  prompts: Sequence[str] | None,
  completions: Sequence[str],
  *,
  answer: Sequence[Any] | None = None,
  **fields: Any,
) -> np.ndarray:
  """1.0 where the completion's final answer equals the reference `answer` numerically, else 0.0.

    r_b = 1[|parse(extract(completions[b])) − parse(answer[b])| ≤ 1e-6]

  The extraction order (GSM8K "####", \\boxed{}, "the answer is", last number) is that of the
  module docstring; the absolute tolerance 1e-6 absorbs float formatting ("7.0" == "7"). A
  completion with no number, or a reference that does not parse, scores 0.0.

  Args:
    prompts: B prompt strings (unused; may be None).
    completions: B completion strings.
    answer: B reference answers (numbers or strings; "... #### 42" solutions are accepted).
    **fields: other per-row fields, ignored.

  Returns:
    float32 [B] of 0.0 / 1.0.

  Example:
    >>> math_answer_reward(["2+3?"], ["The answer is 5."], answer=["5"])
    array([1.], dtype=float32)
  """
  answer = require_field("answer", answer, "math_answer_reward")
  b = batch_size(prompts, completions, answer=answer)
  out = np.zeros((b,), np.float32)
  for i, (text, ref) in enumerate(zip(completions, answer)):
    predicted = extract_final_answer(text)
    out[i] = float(predicted is not None and answers_match(predicted, ref))
  return out
