"""What the benchmark scripts share: median wall time of a jitted call, collectives in HLO, the
long-context model and its training step.

The scripts run as `python benchmarks/<name>.py`, so this module is imported as a sibling
(`from bench_utils import median_seconds`); the tests import `loop_collectives` the same way
(`benchmarks/` is on pytest's pythonpath).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rljax.models.config import ModelConfig
from rljax.models.transformer import Transformer
from rljax.ops.fused_logprobs import logprobs_from_hidden

# Issue 11's model: V=32000, 4 layers, d=512, MLP 1536, 8 query / 4 KV heads, tied, f32.
LONG_CONTEXT_MODEL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                          num_layers=4, num_heads=8, num_kv_heads=4, tie_word_embeddings=True)

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


def round_robin_seconds(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
  """{name: median wall time of fn()} over `rounds` rounds that call each fn once in turn (a
  drift of the machine's load reaches them alike), after one warm-up call each."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


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


def lm_training_step(config: ModelConfig, *, abstract: bool = True):
  """(jit(value_and_grad(loss)), state) of loss = mean of `logprobs_from_hidden` over a
  [B, T] token batch: one training forward + backward of a Transformer (abstract: the state is
  `nnx.eval_shape`'s, for compile-only memory)."""
  make = lambda: Transformer(config, rngs=nnx.Rngs(0))  # noqa: E731
  graphdef, state = nnx.split(nnx.eval_shape(make) if abstract else make())

  def loss(state, tokens):
    model = nnx.merge(graphdef, state)
    hidden = model.hidden_states(tokens)
    return jnp.mean(logprobs_from_hidden(hidden[:, :-1], model.unembedding, tokens[:, 1:]))

  return jax.jit(jax.value_and_grad(loss)), state


def print_side_by_side(title: str, table: str, result: dict, *, freeze: bool,
                       json_path: str | None) -> None:
  """The end of a side-by-side benchmark (rljax vs. Tunix): title, table, wall time, both
  processes' `pip freeze` (unless `freeze` is False) and the whole result as JSON."""
  print(title + "\n")
  print(table)
  print(f"Wall time of the benchmark: {result['wall_seconds']:.0f} s")
  if freeze:
    print("\npip freeze (rljax process): " + " ".join(result["rljax"]["freeze"]))
    if result["tunix"]:
      print("\npip freeze (Tunix process): " + " ".join(result["tunix"]["freeze"]))
  if json_path:
    with open(json_path, "w") as f:
      json.dump(result, f, indent=1)


def require_positive(parser, args, names) -> None:
  """argparse error unless every option in `names` is >= 1."""
  for name in names:
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
