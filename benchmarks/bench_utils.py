"""What the benchmark scripts share: median wall time of a jitted call, collectives in HLO.

The scripts run as `python benchmarks/<name>.py`, so this module is imported as a sibling
(`from bench_utils import median_seconds`); the tests import `loop_collectives` the same way
(`benchmarks/` is on pytest's pythonpath).
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax

COLLECTIVE = r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\("


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of `fn()` over `repeats` runs after one warm-up run (which compiles);
  waits for the result's arrays (`jax.block_until_ready`)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def loop_collectives(hlo: str) -> tuple[int, int]:
  """(collectives inside while-loop bodies, collectives anywhere) of compiled HLO text
  (`jit(f).lower(...).compile().as_text()`): what a decode loop communicates at every step."""
  computations, name = defaultdict(list), None
  for line in hlo.split("\n"):
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      name = header.group(1)
    elif name:
      computations[name].append(line)
  bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
  inside = sum(len(re.findall(COLLECTIVE, "\n".join(computations[b]))) for b in bodies)
  return inside, len(re.findall(COLLECTIVE, hlo))
