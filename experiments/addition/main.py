"""Multi-digit addition from scratch: SFT on careless demonstrations, then GRPO. Prints accuracy.

Run:  python experiments/addition/main.py [--seed 0] [--set sft_steps=1000 ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from experiments.addition.pipeline import AdditionConfig, parse_overrides, run  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
  args = parser.parse_args()
  (task,) = parse_overrides(args.set, AdditionConfig)
  config = AdditionConfig(seed=args.seed, **task)
  start = time.perf_counter()
  result = run(config)
  print(f"accuracy before RL {100 * result['before']:.1f}%  →  after RL "
        f"{100 * result['after']:.1f}%   (SFT {result['sft_seconds']:.0f}s, "
        f"RL {result['rl_seconds']:.0f}s, eval {result['eval_seconds']:.0f}s, "
        f"total {time.perf_counter() - start:.0f}s)")


if __name__ == "__main__":
  main()
