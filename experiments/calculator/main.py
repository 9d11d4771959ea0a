"""Multiplication with a calculator tool: SFT on demonstrations that use the tool on 30 % of the
problems, then multi-turn GRPO. Prints accuracy and tool-use rate before / after RL.

Run:  python experiments/calculator/main.py [--seed 0] [--set rl_steps=40 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.addition.pipeline import parse_overrides  # noqa: E402
from experiments.calculator.pipeline import CalculatorConfig, run  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
  args = parser.parse_args()
  (task,) = parse_overrides(args.set, CalculatorConfig)
  start = time.perf_counter()
  r = run(CalculatorConfig(seed=args.seed, **task))
  print(f"accuracy {100 * r['accuracy_before']:.1f}% → {100 * r['accuracy']:.1f}%, tool use "
        f"{100 * r['tool_rate_before']:.1f}% → {100 * r['tool_rate']:.1f}%   (SFT "
        f"{r['sft_seconds']:.0f}s, RL {r['rl_seconds']:.0f}s, total "
        f"{time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
  main()
