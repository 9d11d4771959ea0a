"""Simple arithmetic word problems, generated in code (no downloads).

Templated sentences with random numbers, e.g.

  "Tom has 3 apples and buys 4 more. How many apples does he have now?"   answer 7

in five kinds: addition, subtraction, multiplication, equal sharing (exact division) and a
two-step "buys then gives away". Every problem carries a short worked solution
("3 + 4 = 7") so that correct and wrong answers can be written for preference pairs.

Splits are deterministic and disjoint: the evaluation problems are drawn first from
`default_rng(seed)`; training problems come from `default_rng(seed + 1)` and skip any question
text that is in the evaluation set.

  >>> problems = train_problems(2)
  >>> problems[0].answer == eval(problems[0].expression)
  True
"""

from __future__ import annotations

import dataclasses

import numpy as np

NAMES = (("Tom", "he"), ("Anna", "she"), ("Sam", "he"), ("Maria", "she"), ("Leo", "he"),
         ("Emma", "she"), ("Omar", "he"), ("Lily", "she"), ("Ravi", "he"), ("Zoe", "she"))
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells",
         "balloons", "oranges")
KINDS = ("add", "sub", "mul", "div", "two_step")

INSTRUCTION = ("Solve the problem step by step. Then write the final answer as a number on the "
               "last line in the form \"#### <answer>\".")


@dataclasses.dataclass(frozen=True)
class WordProblem:
  """One problem: its question, the integer answer and the arithmetic that gives it."""

  question: str
  answer: int
  expression: str  # e.g. "3 + 4" (Python syntax; `//` for the exact divisions)
  kind: str

  def prompt(self) -> str:
    """The user message: the question and the answer-format instruction."""
    return f"{self.question}\n{INSTRUCTION}"

  def solution(self) -> str:
    """A correct worked answer ending in "#### <answer>"."""
    return worked_answer(self, self.answer)

  def wrong_solution(self, rng: np.random.Generator) -> str:
    """A plausible wrong worked answer: an arithmetic slip of ±1..3 (never the right answer,
    never negative)."""
    delta = int(rng.integers(1, 4)) * (1 if rng.random() < 0.5 or self.answer <= 3 else -1)
    return worked_answer(self, self.answer + delta)


def worked_answer(problem: WordProblem, result: int) -> str:
  """"<expression> = <result>." then "#### <result>" (the format the prompt asks for)."""
  shown = problem.expression.replace("//", "/").replace("*", "×")
  return f"{shown} = {result}.\n#### {result}"


def _one(rng: np.random.Generator) -> WordProblem:
  name, he = NAMES[rng.integers(len(NAMES))]
  item = ITEMS[rng.integers(len(ITEMS))]
  kind = KINDS[rng.integers(len(KINDS))]
  if kind == "add":
    a, b = (int(x) for x in rng.integers(2, 50, size=2))
    q = f"{name} has {a} {item} and buys {b} more. How many {item} does {he} have now?"
    expr = f"{a} + {b}"
  elif kind == "sub":
    a = int(rng.integers(10, 60))
    b = int(rng.integers(1, a))
    q = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?"
    expr = f"{a} - {b}"
  elif kind == "mul":
    a, b = int(rng.integers(2, 10)), int(rng.integers(2, 13))
    q = (f"{name} buys {a} boxes with {b} {item} in each box. How many {item} does {he} buy "
         "in total?")
    expr = f"{a} * {b}"
  elif kind == "div":
    each, friends = int(rng.integers(2, 13)), int(rng.integers(2, 10))
    q = (f"{name} shares {each * friends} {item} equally among {friends} friends. How many "
         f"{item} does each friend get?")
    expr = f"{each * friends} // {friends}"
  else:
    a, b = (int(x) for x in rng.integers(5, 40, size=2))
    c = int(rng.integers(1, a + b))
    q = (f"{name} has {a} {item}. {he.capitalize()} buys {b} more and then gives {c} away. "
         f"How many {item} does {he} have now?")
    expr = f"{a} + {b} - {c}"
  return WordProblem(question=q, answer=int(eval(expr)), expression=expr, kind=kind)


def sample_problems(n: int, seed: int, *, exclude: frozenset[str] = frozenset()
                    ) -> list[WordProblem]:
  """`n` distinct problems from `default_rng(seed)` whose questions are not in `exclude`."""
  rng, seen, out = np.random.default_rng(seed), set(exclude), []
  for _ in range(200 * n + 1000):
    if len(out) == n:
      break
    p = _one(rng)
    if p.question not in seen:
      seen.add(p.question)
      out.append(p)
  if len(out) < n:
    raise ValueError(f"could only draw {len(out)} distinct problems, asked for {n}.")
  return out


def eval_problems(n: int = 200, *, seed: int = 0) -> list[WordProblem]:
  """The held-out problems (drawn first, from `seed`)."""
  return sample_problems(n, seed)


def train_problems(n: int = 5000, *, seed: int = 0, num_eval: int = 200) -> list[WordProblem]:
  """Training problems (from `seed + 1`), disjoint from `eval_problems(num_eval, seed=seed)`."""
  held_out = frozenset(p.question for p in eval_problems(num_eval, seed=seed))
  return sample_problems(n, seed + 1, exclude=held_out)


def prompt_rows(problems: list[WordProblem]) -> list[dict[str, str]]:
  """{"prompt", "answer"} rows (prompt data for GRPO; `answer` feeds `math_answer_reward`)."""
  return [{"prompt": p.prompt(), "answer": str(p.answer)} for p in problems]


def preference_rows(problems: list[WordProblem], *, seed: int = 0) -> list[dict[str, str]]:
  """{"prompt", "chosen", "rejected"} rows: a correct worked answer vs. a wrong one."""
  rng = np.random.default_rng(seed + 2)
  return [{"prompt": p.prompt(), "chosen": p.solution(), "rejected": p.wrong_solution(rng)}
          for p in problems]
